"""mae pretrain [CONFIG.yaml] [section.field=value ...]: distributed MAE pretraining.

Ray Train V2 (a data-parallel trainer with torch's process group), FSDP2 workers, Ray Data input,
sharded DCP checkpoints under ``run.storage_path/run.name``. Starting again with the same run name
and storage path resumes from the latest complete checkpoint (also with another number of workers).

    mae pretrain jobs/configs/demo.yaml data.source=s3://bucket/shards scaling.num_workers=16
    mae pretrain model.preset=mae_vit_micro_patch4 data.source=./shards train.max_steps=100
    python -m jobs.pretrain ...      (the form `ray job submit -- python -m jobs.pretrain` runs)

The config file is the first argument, given as it is (no option introduces it); the recipes in
this checkout are jobs/configs/demo.yaml and jobs/configs/mae_vit_base_imagenet.yaml.
"""

from __future__ import annotations

import argparse
import sys
import time

from jobs.core import checkpoint as ckpt
from jobs.core.common import init_ray, one_line_errors, parse_config_command
from jobs.core.config import describe, load
from jobs.core.launch import cpu_needs, failure_of, fit


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mae pretrain", description=__doc__, add_help=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="YAML config (sections: model, data, optim, train, scaling, run)")
    ap.add_argument("overrides", nargs="*", help="section.field=value overrides")
    ap.add_argument("-h", "--help", action="store_true")
    return ap


def parse(argv: list[str], *, strict: bool = False) -> argparse.Namespace:
    return parse_config_command("mae pretrain", parser(), argv, strict=strict)


def check(argv: list[str]) -> str | None:
    """What ``mae submit`` checks on the user's machine before a job exists, without Ray, torch
    or storage: the arguments, the config file (it must exist and parse) and every override,
    validated. -> the config file named, if any."""
    a = parse(argv, strict=True)
    load(a.config, a.overrides)
    return a.config


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with one_line_errors("mae pretrain"):
        a = parse(argv)
    if a.help:
        print(parser().format_help() + "\nfields (section.field = default):" + describe())
        return 0
    t_launch = time.time()
    with one_line_errors("mae pretrain"):
        cfg = load(a.config, a.overrides)
        init_ray(cfg.run.address or None, num_cpus=sum(cpu_needs(cfg)))
        result, plan = fit(cfg, t_launch)
    err = failure_of(cfg)
    if err:
        print(f"mae pretrain: error: {err}", file=sys.stderr)
        return 1
    rd = plan.run_dir
    latest = ckpt.latest_complete(rd)
    print(f"[mae] done. run directory: {rd}\n"
          f"  checkpoints: {rd}/checkpoint_* (latest: {latest['uri'] if latest else 'none'})\n"
          f"  metrics:     {rd}/metrics.jsonl and TensorBoard events in {rd}/tb\n"
          f"  pictures:    {rd}/reconstruction_latest.png and {rd}/pictures/\n"
          f"  config:      {rd}/config.yaml")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
