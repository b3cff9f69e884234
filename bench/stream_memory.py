"""Memory of the stream's processes against blocks streamed: one execution for the whole run
(``data.segment_images=0``) against segments, side by side in one run.

Ray Data keeps a record of every block an operator has output for its execution's life; a run's
stream was one execution, so the process that runs its executor (a run's split coordinator, on the
head node) grew with the run's length. Here the project's own stream (``pipeline.dataset``) over
320 tiny images from a local S3 server (SeaweedFS) is consumed in this process, where the executor
then runs (a coordinator would add one actor call per block, and only that): as one execution, and
segment after segment (``pipeline.segments``, the next segment opened in the background before the
seam). The stream is in its deterministic mode, one image per block, which Ray Data does not join
into larger blocks: blocks and images are the same count. Every ``--every`` blocks, the resident
memory (RSS) of this process and of Ray Data's stats actor is read from /proc. The segments run
second, in the same process: compare the growth, not the levels.

    python -m bench.stream_memory [--blocks 200000] [--every 20000] [--segment-epochs 50]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from tests.support import RAY_LOCAL_ENV, apply_ray_env


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pids(class_name: str) -> list[int]:
    from ray.util.state import list_actors
    return [a.pid for a in list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])]


def sample(blocks: int) -> dict:
    stats = sum(rss_mib(p) for p in pids("_StatsActor"))
    return {"blocks": blocks, "executor": rss_mib(os.getpid()), "stats_actor": stats}


def stream(mode: str, cfg, run_id: str, blocks: int, every: int, k: int) -> list[dict]:
    import ray

    from pipeline.dataset import build_dataset, build_segments
    from pipeline.segments import Segments, segment_batches
    from pipeline.stream import position_actor
    kw = {"batch_size": None, "prefetch_batches": 2}  # block by block, as they come
    rows = []
    if mode == "one":
        _, _, stream = build_dataset(cfg, epochs=1)
        ds, _, _ = build_dataset(cfg, epochs=blocks // stream.rows_per_epoch + 2, run_id=run_id)
        it = iter(ds.iter_batches(**kw))
    else:
        pair, _, stream = build_segments(cfg, epochs_per_segment=k, start_image=0, run_id=run_id)
        actor = position_actor(run_id)

        def open_segment(s):
            ray.get(actor.set_segment.remote(s % 2, s))
            return pair[s % 2].iter_batches(**kw)
        it = segment_batches(open_segment, Segments(k, stream.rows_per_epoch, 1),
                             start_image=0, batch_size=1, lookahead_rows=4 * cfg.rows_per_unit)
    n, t0 = 0, time.perf_counter()
    for _ in it:
        n += 1
        if n % every == 0 or n == blocks:
            rows.append(sample(n))
            r = rows[-1]
            print(f"  {mode}: {n:>7} blocks  executor's process {r['executor']:7.1f} MiB  stats actor "
                  f"{r['stats_actor']:6.1f} MiB  ({time.perf_counter() - t0:.0f} s)", flush=True)
        if n >= blocks:
            break
    if hasattr(it, "close"):
        it.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=200_000)
    ap.add_argument("--every", type=int, default=20_000)
    ap.add_argument("--segment-epochs", type=int, default=50, help="epochs of 320 images per segment")
    a = ap.parse_args()
    apply_ray_env(RAY_LOCAL_ENV)
    from tests.s3server import S3Server
    server = S3Server()
    work = tempfile.mkdtemp(prefix="bench-stream-")
    try:
        os.environ.update(server.env())
        bucket = server.create_bucket("bench")
        import ray

        from jobs.core.common import init_ray
        from pipeline.config import DataConfig
        from pipeline.prepare import PrepareConfig, prepare
        from pipeline.runactor import release_run_actor, run_actor_name
        from pipeline.synthetic import write_labeled_folder
        init_ray(num_cpus=4)  # with its dashboard: the State API finds the actors
        write_labeled_folder(os.path.join(work, "raw"), n_per_class=80, size=16, seed=0)
        src = f"s3://{bucket}/tiny"
        prepare(PrepareConfig(src=os.path.join(work, "raw"), dst=src, val_fraction=0.0), progress=False)
        # one read unit of 320 rows per epoch, one row per output block: 320 blocks per decode task
        base = dict(source=src, split="train", img_size=16, patch_size=4, augment=False, rows_per_unit=320,
                    decode_batch_size=32, deterministic=True, decode_concurrency=1)
        out = {}
        for mode, k in (("one", 0), ("segments", a.segment_epochs)):
            cfg = DataConfig(**base, segment_images=320 * k)
            run_id = f"bench-stream-{mode}"
            try:
                out[mode] = stream(mode, cfg, run_id, a.blocks, a.every, k)
            finally:
                release_run_actor(run_actor_name(run_id))  # the run's one actor: position and counters
        print(f"\n{a.blocks} blocks through the project's stream (1 image per block), RSS in MiB, "
              f"segments of {a.segment_epochs} epochs x 320 rows:")
        print("| blocks | executor's process, one execution | executor's process, segments | stats actor, one | "
              "stats actor, segments |")
        print("|---|---|---|---|---|")
        for r1, r2 in zip(out["one"], out["segments"]):
            print(f"| {r1['blocks']} | {r1['executor']:.0f} | {r2['executor']:.0f} | {r1['stats_actor']:.0f} | "
                  f"{r2['stats_actor']:.0f} |")
        g1 = out["one"][-1]["executor"] - out["one"][0]["executor"]
        g2 = out["segments"][-1]["executor"] - out["segments"][0]["executor"]
        span = out["one"][-1]["blocks"] - out["one"][0]["blocks"]
        print(f"growth from {out['one'][0]['blocks']} to {out['one'][-1]['blocks']} blocks: one execution "
              f"{g1:+.0f} MiB ({g1 * 2**20 / max(1, span):.0f} B/block), segments {g2:+.0f} MiB "
              f"({g2 * 2**20 / max(1, span):.0f} B/block)")
    finally:
        # the server and the work dir first: a Ray worker touched after ray.shutdown() exits the
        # process on the spot (seen at the end of this bench), which left both behind
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
        import ray
        ray.shutdown()


if __name__ == "__main__":
    main()
