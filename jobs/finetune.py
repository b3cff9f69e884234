"""mae finetune PRETRAINED TRAIN_DATA [CONFIG.yaml] [section.field=value ...] [--val VAL_DATA]

Fine-tune a pretrained MAE encoder as an image classifier on Ray Train, with the official recipe
(``main_finetune.py``: layer-wise lr decay, AdamW, warmup + cosine, drop path, RandAugment,
random erasing, mixup + cutmix, label smoothing; its numbers per model size), top-1 / top-5 on
the validation set every epoch, the best checkpoint kept and marked. ``--linprobe``: the paper's
linear probe instead (``main_linprobe.py``: frozen encoder, BatchNorm + Linear head, LARS,
global batch 16384), data-parallel on the same workers.

PRETRAINED: a pretraining run or checkpoint directory of this project (its latest complete
checkpoint; the model preset comes with it), an official ``mae_pretrain_vit_*.pth`` (give
model.preset), or ``none`` (the same ViT from random initialization: a baseline).

    mae finetune s3://bucket/runs/mae-vit-b s3://bucket/imagenet-train --val s3://bucket/imagenet-val \\
        scaling.num_workers=32 scaling.use_gpu=true run.storage_path=s3://bucket/runs
    mae finetune ./runs/demo ./digits-shards train.epochs=10      (the val split of the same dataset)
    python -m jobs.finetune ...      (the form `ray job submit` runs)

Same run name and storage path resume the run. Results: <run>/results.json (final and best
top-1), checkpoints (best marked in checkpoints.json), metrics.jsonl and TensorBoard as pretraining.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from jobs.core.common import UserError, init_ray, one_line_errors, refuse_config_flag


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mae finetune", description=__doc__, add_help=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pretrained", nargs="?", help="pretraining run/checkpoint directory, official .pth, or none")
    ap.add_argument("data", nargs="?", help="labeled training set: prepared shards or a class_name/file.jpg folder")
    ap.add_argument("overrides", nargs="*", help="[CONFIG.yaml] then section.field=value overrides")
    ap.add_argument("--val", default=None, help="validation set (prepared shards; default: the val split of DATA)")
    ap.add_argument("--linprobe", action="store_true", help="the paper's linear probe instead of fine-tuning")
    ap.add_argument("-h", "--help", action="store_true")
    return ap


def parse(argv: list[str], *, strict: bool = False) -> argparse.Namespace:
    refuse_config_flag("mae finetune", argv)
    ap = parser()
    if strict and any(x in ("-h", "--help") for x in argv):
        raise UserError("--help is not submitted: run `mae finetune --help` here")
    if strict:
        def error(message: str):
            raise UserError(message)
        ap.error = error
    a = ap.parse_intermixed_args(argv)  # --val and --linprobe anywhere, before or after the overrides
    if not a.help and (not a.pretrained or not a.data):
        raise UserError("give PRETRAINED (a run, checkpoint, .pth, or none) and TRAIN_DATA: "
                        "mae finetune PRETRAINED TRAIN_DATA [CONFIG.yaml] [section.field=value ...]")
    a.config = a.overrides.pop(0) if a.overrides and "=" not in a.overrides[0] else None
    return a


def pretrained_model(uri: str) -> tuple[str, list[str]]:
    """PRETRAINED -> (the weights to start from, model overrides that describe them). A run or
    checkpoint of this project brings its model section; a .pth file or ``none`` brings none."""
    if uri.lower() in ("none", "random", "scratch"):
        return "", []
    if uri.endswith((".pth", ".pt", ".safetensors")):
        return uri, []
    import yaml

    from jobs.core.weights import select
    from pipeline.storage import parse_uri, read_bytes
    ckpt = select(uri)["uri"]
    saved = yaml.safe_load(read_bytes(parse_uri(ckpt).join("config.yaml"))) or {}
    model = saved.get("model", {})
    if "finetune" in saved:
        raise UserError(f"{uri}: a fine-tuning run; give the pretraining run it started from (or resume this one "
                        "by its run.name)")
    return ckpt, [f"model.preset={model.get('preset', 'mae_vit_base_patch16')}",
                  f"model.overrides={json.dumps(model.get('overrides') or {})}"]


def config_of(a: argparse.Namespace, init_from: str, model_overrides: list[str]):
    from jobs.core.config import load
    from jobs.core.finetune_config import FinetuneConfig, LinprobeConfig
    overrides = [*model_overrides, f"model.init_from={init_from}", f"data.source={a.data}"]
    if a.val:
        overrides.append(f"finetune.val={a.val}")
    return load(a.config, overrides + list(a.overrides), cls=LinprobeConfig if a.linprobe else FinetuneConfig)


def check(argv: list[str]) -> str | None:
    """What ``mae submit`` checks locally: the arguments and the config (PRETRAINED and the data are
    the cluster's to read)."""
    a = parse(argv, strict=True)
    config_of(a, "", [])
    return a.config


def results(run_dir: str) -> dict:
    """The run's evaluations (metrics.jsonl) -> final and best top-1, written to results.json."""
    from jobs.core.finetuner import summary
    from pipeline.storage import parse_uri, read_bytes, write_bytes
    u = parse_uri(run_dir)
    rows = [json.loads(x) for x in read_bytes(u.join("metrics.jsonl")).decode().splitlines() if x.strip()]
    out = summary(rows)
    write_bytes(u.join("results.json"), json.dumps(out, indent=1).encode())
    return out


def run(a: argparse.Namespace, t_launch: float | None = None) -> dict:
    from jobs.core import checkpoint as ckpt
    from jobs.core.launch import cpu_needs, failure_of, fit
    init_from, model = pretrained_model(a.pretrained)
    cfg = config_of(a, init_from, model)
    init_ray(cfg.run.address or None, num_cpus=sum(cpu_needs(cfg)) + 1)  # + the validation reads
    _, plan = fit(cfg, t_launch or time.time())
    err = failure_of(cfg)
    if err:
        raise UserError(err)
    res = results(plan.run_dir)
    best = ckpt.Finalizer(ckpt._store(plan.run_dir), cfg.train.keep_last, cfg.train.best_metric,
                          best_mode=cfg.train.best_mode).best()
    return {**res, "run": plan.run_dir, "best_checkpoint": ckpt._store(plan.run_dir).uri_of(best["name"]) if best else None}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with one_line_errors("mae finetune"):
        a = parse(argv)
    if a.help:
        from jobs.core.config import describe
        from jobs.core.finetune_config import FinetuneConfig
        print(parser().format_help() + "\nfields (section.field = default):" + describe(FinetuneConfig))
        return 0
    with one_line_errors("mae finetune"):
        res = run(a)
    what = "linear probe" if a.linprobe else "fine-tuning"
    print(f"[mae] {what} done: top-1 {res.get('final_top1', float('nan')):.2f}% final, "
          f"{res.get('best_top1', float('nan')):.2f}% best (step {res.get('best_step')})\n"
          f"  run directory:   {res['run']}\n"
          f"  best checkpoint: {res['best_checkpoint']}  (mae evaluate --finetuned {res['best_checkpoint']} DATA)\n"
          f"  results:         {res['run']}/results.json, metrics.jsonl, TensorBoard in tb/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
