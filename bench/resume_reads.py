"""Bytes each rank reads from object storage to resume, per strategy: ours against every rank reading.

A run resumes every attempt (dozens of restarts over an 800-epoch run), and under DDP every rank
used to read the whole checkpoint (64 ranks x ~4 GB for ViT-L). Here 2 gloo processes (no Ray)
save a checkpoint of a small MAE (ViT-micro by default) under DDP and under FSDP2, upload it to a
local S3 server (SeaweedFS), and load it back under the same strategy through
``jobs.core.checkpoint.load_into``, each rank through a counting proxy of its own, so that the bytes
each rank reads are counted exactly:

- ours:      DDP: rank 0 reads model + optimizer and broadcasts them; FSDP2: each rank fetches the
             byte ranges of its shards (DCP), in file order, neighbours merged into one request;
- baseline:  ``read_once=False``: every DDP rank reads the whole state through DCP.

    python -m bench.resume_reads [--preset mae_vit_micro_patch4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile

from tests.support import RAY_LOCAL_ENV, apply_ray_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, endpoints, remote, preset):
    os.environ["AWS_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL_S3"] = endpoints[rank]
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from jobs.core import checkpoint as ckpt
    from mae_model import MaskedAutoencoder, config
    from mae_model.parallelize import parallelize, replicate
    from pipeline.storage import Store
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = getattr(config, preset)()

    def build(strategy):
        torch.manual_seed(0)
        m = MaskedAutoencoder(cfg)
        m = parallelize(m, init_device_mesh("cpu", (world,))) if strategy == "fsdp" else replicate(m, torch.device("cpu"))
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3)

    for strategy in ("ddp", "fsdp"):
        model, opt = build(strategy)
        x = torch.randint(0, 256, (2, cfg.num_patches, cfg.patch_dim), dtype=torch.uint8)
        model(x)[0].backward()
        opt.step()  # optimizer state exists
        local = os.path.join(out, strategy)
        ckpt.write_local(model, opt, local, rank=rank, train_state={"step": 1}, config_yaml="")
        dist.barrier()
        modes = ("ours", "baseline") if strategy == "ddp" else ("ours",)  # FSDP2 ranks read their shards either way
        if rank == 0:  # one copy per load: each load's requests are those under its prefix
            from tests.support import upload_dir
            for mode in modes:
                upload_dir(local, f"{remote}/{strategy}-{mode}")
        dist.barrier()
        for mode in modes:
            model, opt = build(strategy)
            ckpt.load_into(model, opt, Store(f"{remote}/{strategy}-{mode}"), rank=rank, restore_rng=False,
                           read_once=None if mode == "ours" else False)
            dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mae_vit_micro_patch4")
    ap.add_argument("--world", type=int, default=2)
    a = ap.parse_args()
    apply_ray_env(RAY_LOCAL_ENV)
    import torch.multiprocessing as mp

    from tests.s3proxy import CountingProxy
    from tests.s3server import S3Server
    server = S3Server()
    tmp = tempfile.mkdtemp(prefix="mae-bench-resume-")
    try:
        os.environ.update(server.env())
        bucket = server.create_bucket("resume")
        proxies = [CountingProxy(server.port) for _ in range(a.world)]
        remote = f"s3://{bucket}/ckpt"
        mp.spawn(_worker, args=(a.world, _free_port(), tmp, [p.endpoint for p in proxies], remote, a.preset),
                 nprocs=a.world, join=True)
        key = remote.split("/", 3)[3]
        print(f"{a.preset}, {a.world} ranks, bytes of DCP files (.distcp, .metadata) each rank read to resume:")
        for strategy, mode in (("ddp", "baseline"), ("ddp", "ours"), ("fsdp", "ours")):
            d = os.path.join(tmp, strategy)
            size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".distcp") or f == ".metadata")
            gets = [[q for q in p.since(0, f"/{bucket}/{key}/{strategy}-{mode}/") if q.method == "GET"
                     and (q.path.endswith(".distcp") or q.path.endswith("/.metadata"))] for p in proxies]
            per = [sum(q.received for q in g) for g in gets]
            print(f"  {strategy:4s} {mode:8s}: checkpoint {size / 2**20:.2f} MiB, per rank "
                  f"{[round(n / 2**20, 2) for n in per]} MiB in {[len(g) for g in gets]} GETs, "
                  f"in all {sum(per) / size:.2f}x the checkpoint", flush=True)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
