"""The training loop's overhead per step from reporting to Ray, at ``train.log_every=1``, in one run:

- before:  what the loop did until now: ``ray.train.report`` at every log step
           (``train.report_every=1 train.min_report_interval_s=0``). In Train V2 each report waits
           for the controller to take the previous one (it polls about every 2 s) and is a
           barrier of every worker.
- now:     the default: a log line at every step (rank 0, local files), reports to Ray only at
           checkpoints (and at ``train.report_every`` for a Tune scheduler, at most every
           ``train.min_report_interval_s``).

Both run the same micro MAE with 2 workers on a local Ray, data from a local folder, 48 steps,
one checkpoint at the end. Per-step time is the median gap between consecutive log lines
(``metrics.jsonl``), steady state (the first 4 steps dropped).

    python -m bench.report_overhead [--steps 48]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile

from tests.support import RAY_LOCAL_ENV, apply_ray_env, tiny_config


def step_times(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        t = [json.loads(x)["time"] for x in f]
    return [b - a for a, b in zip(t, t[1:])][4:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=48)
    a = ap.parse_args()
    apply_ray_env(RAY_LOCAL_ENV)
    tmp = tempfile.mkdtemp(prefix="mae-bench-report-")
    try:
        from pipeline.synthetic import write_labeled_folder
        write_labeled_folder(os.path.join(tmp, "src"), n_per_class=64, size=48, seed=0)
        from jobs.core.common import init_ray
        init_ray(num_cpus=4)
        from pipeline.prepare import PrepareConfig, prepare
        prepare(PrepareConfig(src=os.path.join(tmp, "src"), dst=os.path.join(tmp, "shards"), shard_size_mb=0.1),
                progress=False)
        from jobs.core.launch import fit
        base = ["data.decode_batch_size=16", "data.rows_per_unit=32", "train.batch_size=16", "train.log_every=1",
                f"train.max_steps={a.steps}", f"train.ckpt_every={a.steps}", "optim.warmup_steps=4"]
        med = {}
        for name, extra in (("before", ["train.report_every=1", "train.min_report_interval_s=0"]), ("now", [])):
            cfg = tiny_config(f"{tmp}/shards", f"{tmp}/runs", name, *base, *extra, short_run=False)
            result, _ = fit(cfg, verbose=False)
            assert result.error is None
            med[name] = statistics.median(step_times(os.path.join(tmp, "runs", name)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"micro MAE, 2 workers, log_every=1, {a.steps} steps, median seconds per step:")
    print(f"  before (report at every log step):     {med['before']:.3f} s")
    print(f"  now    (reports at checkpoints only):   {med['now']:.3f} s")
    print(f"  ratio before / now:                     {med['before'] / med['now']:.1f}x")


if __name__ == "__main__":
    main()
