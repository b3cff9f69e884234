"""How long a checkpoint save holds the training loop: the trainer's own save path with
``train.async_checkpoint=false`` (the loop writes the shard to the node's disk and waits for the
upload: Ray Train's SYNC mode) against ``true`` (the loop waits only for a copy of the state in host
memory; the shard's write, the upload, hashing, the metrics log and the ``COMPLETE`` marker follow in
the background), side by side in one run.

Two Train workers (FSDP2 over gloo) on a local Ray pretrain ``--preset`` on the digits for
``--steps`` steps with a checkpoint every ``--every`` steps to the tests' S3 server (SeaweedFS on
127.0.0.1, started here). Read back from each run's ``metrics.jsonl``: the stall of every save
(``time/checkpoint_stall_s``, measured by rank 0 from the start of the save to the loop going on)
and the step time around it; from storage: that every checkpoint is complete and loads.

    python -m bench.checkpoint_upload [--preset mae_vit_base_patch16] [--steps 9] [--every 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

from tests.support import RAY_LOCAL_ENV, apply_ray_env


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mae_vit_base_patch16")
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--every", type=int, default=4)
    a = ap.parse_args()
    apply_ray_env(RAY_LOCAL_ENV)
    from tests.s3server import S3Server
    server = S3Server()
    work = tempfile.mkdtemp(prefix="bench-ckpt-")
    try:
        os.environ.update(server.env())
        bucket = server.create_bucket("bench")
        import ray

        from jobs.core import checkpoint as ckpt
        from jobs.core.common import init_ray
        from jobs.core.config import load
        from jobs.core.launch import fit, run_dir_of
        from pipeline.prepare import PrepareConfig, prepare
        from pipeline.storage import read_bytes
        from pipeline.synthetic import write_digits_folder
        init_ray(num_cpus=4)
        write_digits_folder(os.path.join(work, "raw"))
        shards = f"s3://{bucket}/digits"
        prepare(PrepareConfig(src=os.path.join(work, "raw"), dst=shards, val_fraction=0.0, shard_size_mb=0.25),
                progress=False)
        rows = {}
        for mode in ("false", "true"):
            cfg = load(None, [f"model.preset={a.preset}", f"data.source={shards}", "train.batch_size=1",
                              f"train.max_steps={a.steps}", "train.log_every=1", f"train.ckpt_every={a.every}",
                              "train.keep_last=2", "train.vis_images=0", "scaling.num_workers=2",
                              "scaling.strategy=fsdp", f"train.async_checkpoint={mode}",
                              f"run.storage_path=s3://{bucket}/runs", f"run.name=async-{mode}"])
            t0 = time.perf_counter()
            result, _ = fit(cfg, verbose=False)
            wall = time.perf_counter() - t0
            assert result.error is None, result.error
            run = run_dir_of(cfg)
            m = [json.loads(x) for x in read_bytes(f"{run}/metrics.jsonl").decode().splitlines()]
            stalls = [r["time/checkpoint_stall_s"] for r in m if "time/checkpoint_stall_s" in r]
            # a step without a save: the images/s of log windows that held no save
            plain = [r["throughput/images_per_s"] for r in m[1:] if "time/checkpoint_stall_s" not in r
                     and r["step"] % a.every and r["step"] != a.steps]
            latest = ckpt.latest_complete(run)
            man = json.loads(read_bytes(f"{latest['uri']}/manifest.json"))
            assert latest["step"] == a.steps and man["world_size"] == 2
            rows[mode] = {"stalls": stalls, "wall": wall, "mib": man["total_bytes"] / 2**20,
                          "step_s": 2 / statistics.mean(plain) if plain else float("nan")}
        sync, asyn = (statistics.mean(rows[k]["stalls"]) for k in ("false", "true"))
        print(f"{a.preset}, 2 workers (FSDP2, gloo), a checkpoint of {rows['true']['mib']:.0f} MiB every "
              f"{a.every} steps to S3 on 127.0.0.1, {a.steps} steps per mode")
        for k, label in (("false", "train.async_checkpoint=false (upload on the loop)"),
                         ("true", "train.async_checkpoint=true  (upload in the background)")):
            r = rows[k]
            print(f"  {label}: stall per save {', '.join(f'{s:.2f}' for s in r['stalls'])} s "
                  f"(mean {statistics.mean(r['stalls']):.2f}); a step without a save {r['step_s']:.2f} s; "
                  f"run {r['wall']:.0f} s")
        print(f"  ratio of the mean stall, sync / async: {sync / max(asyn, 1e-6):.1f}x; the async stall is "
              f"{100 * asyn / max(sync, 1e-9):.1f}% of the sync one")
        ray.shutdown()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
