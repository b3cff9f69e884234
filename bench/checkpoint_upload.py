"""Time a checkpoint upload holds the training loop: Ray Train V2's SYNC upload (what the trainer
uses) against its ASYNC upload, side by side in one run.

Two Train workers on a local Ray each save a shard of ``--mb`` MiB (random bytes, as a DCP shard
is incompressible) to the tests' S3 server (SeaweedFS on 127.0.0.1, started here), ``--saves``
times per mode, with ``--work`` seconds of "training" between saves. Measured on each worker:
how long ``ray.train.report(..., checkpoint=...)`` blocks (the time the GPUs would wait), and, for
ASYNC, how long until the controller registered the checkpoint (the upload's real length).

    python bench/checkpoint_upload.py [--mb 256] [--saves 3] [--work 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def train_fn(config: dict) -> None:
    import ray.train
    from ray.train import CheckpointUploadMode

    rank = ray.train.get_context().get_world_rank()
    out = []
    payload = os.urandom(config["mb"] * 2**20)
    for mode in ("SYNC", "ASYNC"):
        for i in range(config["saves"]):
            d = tempfile.mkdtemp(prefix="bench-ckpt-")
            with open(os.path.join(d, f"shard_{rank}.bin"), "wb") as f:
                f.write(payload)
            t0 = time.perf_counter()
            ray.train.report({"mode": mode, "i": i}, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"{mode.lower()}_{i:03d}",
                             checkpoint_upload_mode=getattr(CheckpointUploadMode, mode))
            out.append({"mode": mode, "blocked_s": time.perf_counter() - t0})
            if mode == "SYNC":  # ASYNC deletes its local copy after the upload itself
                shutil.rmtree(d, ignore_errors=True)
            time.sleep(config["work"])  # the next steps of training
    if rank == 0:
        with open(config["out"], "w") as f:
            json.dump(out, f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--work", type=float, default=3.0)
    a = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray on 127.0.0.1 only
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    from s3server import S3Server
    server = S3Server()
    try:
        os.environ.update(server.env())
        bucket = server.create_bucket("bench")
        import ray
        import ray.train
        from ray.train.torch import TorchTrainer

        from pipeline.storage import pyarrow_fs
        ray.init(num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
        out = os.path.join(tempfile.mkdtemp(prefix="bench-"), "times.json")
        fs, root = pyarrow_fs(f"s3://{bucket}/runs")
        t0 = time.perf_counter()
        TorchTrainer(train_fn, train_loop_config={"mb": a.mb, "saves": a.saves, "work": a.work, "out": out},
                     scaling_config=ray.train.ScalingConfig(num_workers=2),
                     run_config=ray.train.RunConfig(name="upload", storage_path=root, storage_filesystem=fs)).fit()
        total = time.perf_counter() - t0
        with open(out) as f:
            rows = json.load(f)
        shutil.rmtree(os.path.dirname(out), ignore_errors=True)
        sync = statistics.mean(r["blocked_s"] for r in rows if r["mode"] == "SYNC")
        asyn = statistics.mean(r["blocked_s"] for r in rows if r["mode"] == "ASYNC")
        print(f"checkpoint of 2 x {a.mb} MiB to S3 on 127.0.0.1, {a.saves} saves per mode, {a.work:g} s of work "
              f"between saves ({total:.0f} s in all)")
        print(f"  SYNC  (ours): report() blocks {sync:.2f} s per save")
        print(f"  ASYNC       : report() blocks {asyn:.2f} s per save")
        print(f"  ratio SYNC / ASYNC: {sync / max(asyn, 1e-6):.1f}x")
        ray.shutdown()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
