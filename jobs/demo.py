"""mae demo: the whole path on this machine, no download.

synthetic labeled images -> mae prepare (Parquet shards + manifest) -> mae pretrain (a small
MAE, 2 workers under FSDP2 on a local Ray cluster) -> checkpoints, metrics and reconstruction
pictures under the demo directory.
"""

from __future__ import annotations

import argparse
import os
import time

from jobs.core.common import init_ray, one_line_errors


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mae demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/demo", help="where data and the run go (default runs/demo)")
    ap.add_argument("--images-per-class", type=int, default=320)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="per worker")
    ap.add_argument("--fresh", action="store_true", help="delete the previous demo run first")
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    t0 = time.time()
    work = os.path.abspath(a.workdir)
    raw, shards, runs = (os.path.join(work, d) for d in ("data/raw", "data/shards", "runs"))
    with one_line_errors("mae demo"):
        if a.fresh and os.path.isdir(work):
            import shutil
            shutil.rmtree(work)
        from pipeline.prepare import PrepareConfig, prepare
        from pipeline.synthetic import write_labeled_folder
        if not os.path.isdir(raw):
            print(f"[demo] writing {4 * a.images_per_class} synthetic labeled images to {raw}", flush=True)
            write_labeled_folder(raw, n_per_class=a.images_per_class, size=48, seed=0)
        init_ray(num_cpus=max(4, os.cpu_count() or 2))
        if not os.path.exists(os.path.join(shards, "manifest.json")):
            m = prepare(PrepareConfig(src=raw, dst=shards, val_fraction=0.1, shard_size_mb=0.25, overwrite=True))
            print(f"[demo] prepared {m['counts']['ok']} images into {shards}", flush=True)
        from jobs.core.config import load
        from jobs.core.launch import fit
        cfg = load(None, [
            "model.preset=mae_vit_micro_patch4", f"data.source={shards}",
            "data.decode_batch_size=64", "data.shuffle_buffer=256",
            f"train.batch_size={a.batch_size}", f"train.max_steps={a.steps}",
            "train.log_every=20", f"train.ckpt_every={max(1, a.steps // 3)}", "train.keep_last=2",
            "optim.base_lr=4e-3", "optim.warmup_steps=20", "optim.clip_grad=1.0",
            f"scaling.num_workers={a.workers}", f"run.storage_path={runs}", "run.name=mae-demo",
        ])
        _, plan = fit(cfg, t0)
    rd = plan["run_dir"]
    print(f"\n[demo] finished in {time.time() - t0:.0f}s. Results:\n"
          f"  run directory:  {rd}\n"
          f"  checkpoints:    {rd}/checkpoint_*  (DCP shards + manifest + COMPLETE marker)\n"
          f"  metrics:        {rd}/metrics.jsonl, TensorBoard: tensorboard --logdir {rd}/tb\n"
          f"  reconstruction: {rd}/reconstruction_latest.png\n"
          f"  config:         {rd}/config.yaml\n"
          f"Next: mae evaluate {rd} {shards}          (k-NN + linear probe of the encoder)\n"
          f"      mae ckpt list {rd}; mae ckpt export {rd} runs/demo/encoder.safetensors --format timm\n"
          f"Run it again to resume (it will find the finished run); --fresh starts over.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
