"""mae demo: the whole path on this machine, no download.

real labeled images (scikit-learn's 1,797 handwritten digits, shipped in its wheel; or synthetic
textures with --data synthetic) -> mae prepare (Parquet shards + manifest) -> mae pretrain (a
small MAE, 2 workers on a local Ray cluster) -> checkpoints, metrics and reconstruction pictures
under the demo directory, and the `mae evaluate` commands that compare the encoder with the same
encoder at random initialization.
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
    ap.add_argument("--data", choices=["digits", "synthetic"], default="digits",
                    help="digits: sklearn's handwritten digits (real scans, 10 classes); synthetic: textures")
    ap.add_argument("--images-per-class", type=int, default=320, help="--data synthetic only")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16, help="per worker")
    ap.add_argument("--fresh", action="store_true", help="delete the previous demo run first")
    return ap


# The toy-scale fine-tuning recipe of bench/RESULTS.md: the official optimizer and regularizers, crops
# keeping the digit, no flips; RandAugment, mixup/cutmix and erasing off (at 210 steps they hold both
# encoders near chance).
FINETUNE_DEMO = ("data.crop_scale=[0.8,1.0]", "data.hflip=0", "data.auto_augment=", "finetune.mixup=0",
                 "finetune.cutmix=0", "finetune.reprob=0", "optim.lr=5e-3", "optim.warmup_epochs=1",
                 "train.epochs=10", "train.batch_size=32")


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
        from pipeline.synthetic import write_digits_folder, write_labeled_folder
        if not os.path.isdir(raw):
            if a.data == "digits":
                print(f"[demo] writing scikit-learn's 1,797 handwritten digits as 36 px PNGs to {raw}", flush=True)
                write_digits_folder(raw)
            else:
                print(f"[demo] writing {4 * a.images_per_class} synthetic labeled images to {raw}", flush=True)
                write_labeled_folder(raw, n_per_class=a.images_per_class, size=48, seed=0)
        init_ray(num_cpus=max(4, os.cpu_count() or 2))
        if not os.path.exists(os.path.join(shards, "manifest.json")):
            m = prepare(PrepareConfig(src=raw, dst=shards, val_fraction=0.25, shard_size_mb=0.25, overwrite=True))
            print(f"[demo] prepared {m['counts']['ok']} images into {shards}", flush=True)
        from jobs.core.config import load
        from jobs.core.launch import fit
        # bench/RESULTS.md, "Learning on real images": crops keep >= 80% of a digit, no flips (a
        # mirrored digit is another glyph), lr 1e-3 for a global batch of 32
        recipe = (["data.crop_scale=[0.8,1.0]", "data.hflip=0", "optim.lr=1e-3"] if a.data == "digits"
                  else ["optim.base_lr=4e-3"])
        cfg = load(None, [
            "model.preset=mae_vit_micro_patch4", f"data.source={shards}",
            "data.decode_batch_size=64", "data.shuffle_buffer=256", *recipe,
            f"train.batch_size={a.batch_size}", f"train.max_steps={a.steps}",
            "train.log_every=50", f"train.ckpt_every={max(1, a.steps // 4)}", "train.keep_last=2",
            "optim.warmup_steps=20", "optim.clip_grad=1.0",
            f"scaling.num_workers={a.workers}", f"run.storage_path={runs}", "run.name=mae-demo",
        ])
        _, plan = fit(cfg, t0)
    rd = plan.run_dir
    print(f"\n[demo] finished in {time.time() - t0:.0f}s. Results:\n"
          f"  run directory:  {rd}\n"
          f"  checkpoints:    {rd}/checkpoint_*  (DCP shards + manifest + COMPLETE marker)\n"
          f"  metrics:        {rd}/metrics.jsonl, TensorBoard: tensorboard --logdir {rd}/tb\n"
          f"  reconstruction: {rd}/reconstruction_latest.png\n"
          f"  config:         {rd}/config.yaml\n"
          f"Next: mae evaluate {rd} {shards} --baseline\n"
          f"      (k-NN + linear probe of the encoder, beside the same encoder untrained)\n"
          + ("      on the digits, expect k-NN ~70% vs ~45% and linear ~90% vs ~80% (bench/RESULTS.md)\n"
             if a.data == "digits" else "") +
          f"      mae ckpt list {rd}; mae ckpt export {rd} runs/demo/encoder.safetensors --format timm\n"
          f"Then fine-tune it (the paper's headline number), and the same ViT from scratch to compare:\n"
          f"      mae finetune {rd} {shards} {' '.join(FINETUNE_DEMO)} run.storage_path={runs} run.name=ft-mae\n"
          f"      mae finetune none {shards} {' '.join(FINETUNE_DEMO)} model.preset=mae_vit_micro_patch4 "
          f"run.storage_path={runs} run.name=ft-scratch\n"
          + ("      on the digits, expect ~65-75% top-1 from the MAE vs ~35-58% from scratch, ~1 min each (bench/RESULTS.md)\n"
             if a.data == "digits" else "") +
          f"Run it again to resume (it will find the finished run); --fresh starts over.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
