"""The parallel strategies (FSDP2, HSDP, DDP) over gloo with 4 CPU processes against the unsharded
model in one process."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mae_model import MaskedAutoencoder, mae_vit_micro_patch4
from mae_model.parallelize import parallelize

STEPS, B = 4, 8


def _data(cfg):
    g = torch.Generator().manual_seed(7)
    xs = [torch.randint(0, 256, (B, cfg.num_patches, cfg.patch_dim), generator=g, dtype=torch.uint8)
          for _ in range(STEPS)]
    noise = [torch.rand(B, cfg.num_patches, generator=g) for _ in range(STEPS)]
    return xs, noise


def _reference_model(cfg):
    torch.manual_seed(0)
    return MaskedAutoencoder(cfg)


def _opt(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- strategies
def _build(strategy: str, world: int):
    from torch.distributed.device_mesh import init_device_mesh

    from mae_model.parallelize import replicate
    model = _reference_model(mae_vit_micro_patch4())  # the same init on every rank
    if strategy == "fsdp":
        return parallelize(model, init_device_mesh("cpu", (world,)))
    if strategy == "hsdp":  # 2 "nodes" x 2 workers: shard within, replicate across
        return parallelize(model, init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")))
    return replicate(model, torch.device("cpu"))


def _train(model, opt, rank, world, xs, noise):
    from mae_model.parallelize import set_gradient_sync
    per = B // world
    losses = []
    for x, n in zip(xs, noise):
        sl = slice(rank * per, (rank + 1) * per)
        # two micro-batches per step: reduction only on the last, as the trainer accumulates
        half = per // 2
        for micro, part in enumerate((slice(sl.start, sl.start + half), slice(sl.start + half, sl.stop))):
            set_gradient_sync(model, micro == 1)
            loss, _, _ = model(x[part], noise=n[part])
            (loss / 2).backward()
            t = loss.detach().clone() / 2
            dist.all_reduce(t)
            if micro == 0:
                acc = t
            else:
                losses.append((acc + t).item() / world)
        opt.step()
        opt.zero_grad()
    return losses


def _probe(cfg):
    return torch.randint(0, 256, (7, cfg.num_patches, cfg.patch_dim), generator=torch.Generator().manual_seed(3),
                         dtype=torch.uint8)


CROSS = [("fsdp", "hsdp"), ("hsdp", "ddp"), ("ddp", "fsdp")]  # each writes once and reads once


def _strategies_worker(rank, world, port, out_dir, endpoints, remote):
    import time

    # this rank's own counting proxy in front of the S3 server: the bytes each rank reads
    os.environ["AWS_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL_S3"] = endpoints[rank]
    from jobs.core import checkpoint as ckpt
    from pipeline.storage import Store
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = mae_vit_micro_patch4()
    xs, noise = _data(cfg)
    result = {}
    for strategy in ("fsdp", "hsdp", "ddp"):
        model = _build(strategy, world)
        opt = _opt(model)
        first = _train(model, opt, rank, world, xs[:2], noise[:2])
        if strategy == "fsdp":  # each rank holds a quarter; the probe's features are computed in shares
            from jobs.core.probe import sharded_features
            result["local"] = [None] * world
            dist.all_gather_object(result["local"], sum(p.to_local().numel() for p in model.parameters()))
            embedded = []
            forward_features = model.forward_features
            model.forward_features = lambda x: (embedded.append(x.shape[0]), forward_features(x))[1]
            result["feats"] = sharded_features(model, _probe(cfg), rank, world)
            model.forward_features = forward_features
            result["embedded"] = [None] * world
            dist.all_gather_object(result["embedded"], sum(embedded))
        d = os.path.join(out_dir, f"ckpt-{strategy}")
        ckpt.write_local(model, opt, d, rank=rank, train_state={"step": 2, "time": time.time()}, config_yaml="")
        dist.barrier()
        if rank == 0:  # to the S3 server, as a run's checkpoint is
            from support import upload_dir
            upload_dir(d, f"{remote}/ckpt-{strategy}")
        dist.barrier()
        result[strategy] = first
    # each strategy's checkpoint resumes under another, read from the S3 server: the last two steps
    # continue the same run
    for saved, strategy in CROSS:
        model = _build(strategy, world)
        opt = _opt(model)
        ckpt.load_into(model, opt, Store(f"{remote}/ckpt-{saved}"), rank=rank, restore_rng=False)
        result[f"{saved}->{strategy}"] = _train(model, opt, rank, world, xs[2:], noise[2:])
    # rank 0 alone reads under DDP: what stops it stops every rank, as the same one line
    from pipeline.storage import StorageError
    try:
        ckpt.load_into(*(lambda m: (m, _opt(m)))(_build("ddp", world)), Store(f"{remote}/no-such-checkpoint"),
                       rank=rank, restore_rng=False)
        missing = None
    except StorageError as e:
        missing = str(e)
    result["missing"] = [None] * world
    dist.all_gather_object(result["missing"], missing)
    result["accum_after_partial"] = _accumulation_after_a_partial_one(rank, world, xs)
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "losses.pt"))
    dist.destroy_process_group()


def _trainer_step_shell(model, opt):
    """The trainer's own train_step, on a model and optimizer built here (no Ray)."""
    import contextlib

    from jobs.core.config import PretrainConfig
    from jobs.core.trainer import Trainer
    t = object.__new__(Trainer)
    t.cfg = PretrainConfig.from_dict({"data": {"source": "unused"}, "optim": {"clip_grad": 1.0}})
    t.model, t.opt, t.accum, t.device = model, opt, 2, torch.device("cpu")
    t.autocast, t.step, t.total, t.peak, t.warmup = contextlib.nullcontext(), 0, 10, 1e-3, 0
    from jobs.core.metrics import StepWindow
    t.window = object.__new__(StepWindow)  # its sums only: no peak-FLOPs measurement
    t.window.device = t.device
    t.window.reset()
    return t


def _accumulation_after_a_partial_one(rank, world, xs):
    """FSDP2, accumulation 2: a data stream that ends after one micro-batch of a step raises before
    any backward; the next step (new data) equals one taken from scratch: nothing of the partial
    accumulation leaks into it (FSDP2 keeps no-sync gradients in accumulators zero_grad misses)."""
    from jobs.core.trainer import DataExhausted
    per = B // world
    mine = [{"patches": x[rank * per:(rank + 1) * per]} for x in xs]
    runs = []
    for partial_first in (True, False):
        model = _build("fsdp", world)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        t = _trainer_step_shell(model, opt)
        if partial_first:
            t.batches = iter(mine[:1])  # the stream ends mid-accumulation
            try:
                t.train_step()
                raise AssertionError("a partial accumulation was stepped")
            except DataExhausted:
                pass
        torch.manual_seed(100 + rank)  # the same masking noise in both runs
        t.batches = iter(mine[1:3])
        t.train_step()
        runs.append([p.to_local().detach().clone() for p in model.parameters()])
    ok = torch.tensor(float(all(torch.equal(a, b) for a, b in zip(*runs))))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank's shard
    return bool(ok)


@pytest.mark.s3
@pytest.mark.timeout(300)
def test_strategies_train_alike_and_resume_each_others_checkpoints(tmp_path, s3, bucket):
    """fsdp, hsdp (2 x 2 mesh) and ddp, 4 gloo processes, accumulation of 2 micro-batches: the same
    losses as the unsharded model; a checkpoint written under any strategy continues under any,
    read from the S3 server. Each rank talks to S3 through a counting proxy of its own: under DDP
    the checkpoint is read once in all (rank 0 reads, then broadcasts), not once per rank; under
    HSDP each rank reads only its shard's half."""
    from s3proxy import CountingProxy
    cfg = mae_vit_micro_patch4()
    model = _reference_model(cfg)
    opt = _opt(model)
    xs, noise = _data(cfg)
    ref = []
    for i, (x, n) in enumerate(zip(xs, noise)):
        if i == 2:
            from jobs.core.probe import features
            want = features(model, _probe(cfg))  # the unsharded model after the same two steps
        loss, _, _ = model(x, noise=n)
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref.append(loss.item())
    proxies = [CountingProxy(s3.port) for _ in range(4)]
    remote = f"s3://{bucket}/fsdp-cross/{tmp_path.name}"
    try:
        mp.spawn(_strategies_worker, args=(4, _free_port(), str(tmp_path), [p.endpoint for p in proxies], remote),
                 nprocs=4, join=True)
    finally:
        for p in proxies:
            p.stop()
    got = torch.load(tmp_path / "losses.pt")
    read = {}  # (saved, strategy) -> bytes of DCP files (shards, .metadata) each rank read
    for saved, strategy in CROSS:
        key = f"/{bucket}/{remote.split('/', 3)[3]}/ckpt-{saved}/"
        size = sum(os.path.getsize(tmp_path / f"ckpt-{saved}" / f) for f in os.listdir(tmp_path / f"ckpt-{saved}")
                   if f.endswith(".distcp") or f == ".metadata")
        read[saved, strategy] = [sum(r.received for r in p.since(0, key) if r.method == "GET"
                                     and (r.path.endswith(".distcp") or r.path.endswith("/.metadata")))
                                 for p in proxies]
        print(f"{saved} checkpoint ({size} B) read under {strategy}: bytes per rank {read[saved, strategy]} "
              f"= {sum(read[saved, strategy]) / size:.2f}x the checkpoint")
        if strategy == "ddp":  # once in all, by rank 0
            assert 0.9 * size <= sum(read[saved, strategy]) <= 1.1 * size, (read[saved, strategy], size)
            assert read[saved, strategy][1:] == [0, 0, 0], read[saved, strategy]
        if strategy == "hsdp":  # each rank its shard (half the model) and the small replicated entries
            assert all(0 < n <= 0.65 * size for n in read[saved, strategy]), (read[saved, strategy], size)
        # (fsdp from a ddp checkpoint: DCP reads each whole tensor the ddp save wrote, then slices it;
        # every rank reads about all of it)
    print("unsharded:", ref, "\n", got)
    for strategy in ("fsdp", "hsdp", "ddp"):
        assert got[strategy] == pytest.approx(ref[:2], rel=1e-5), strategy
    for saved, strategy in CROSS:
        assert got[f"{saved}->{strategy}"] == pytest.approx(ref[2:], rel=1e-5), (saved, strategy)
    assert ref[-1] < ref[0]  # the steps really trained
    assert got["accum_after_partial"]
    assert len(set(got["missing"])) == 1 and "no DCP .metadata" in got["missing"][0], got["missing"]
    total = sum(p.numel() for p in model.parameters())
    assert sum(got["local"]) == total and all(abs(n / total - 0.25) < 0.02 for n in got["local"])
    assert got["embedded"] == [2, 2, 2, 2]  # each rank its share of the 7 probe images (padded)
    for kind in ("cls", "mean"):
        assert torch.allclose(got["feats"][kind], want[kind], atol=1e-4, rtol=1e-4), kind


def test_auto_strategy_replicates_what_fits_and_shards_what_does_not():
    from mae_model.parallelize import choose_strategy
    gib = 2**30
    # ViT-B (~111M params, ~1.7 GiB of training state) and ViT-L on 80 GB cards: replicated
    assert choose_strategy("auto", n_params=111_000_000, device_bytes=80 * gib, world=64, local_world=8)[0] == "ddp"
    assert choose_strategy("auto", n_params=330_000_000, device_bytes=80 * gib, world=64, local_world=8)[0] == "ddp"
    # 2B params (30 GiB): a node's 8 GPUs hold it sharded; across nodes it is replicated
    name, why = choose_strategy("auto", n_params=2_000_000_000, device_bytes=80 * gib, world=64, local_world=8)
    assert name == "hsdp" and "8 nodes" in why
    assert choose_strategy("auto", n_params=2_000_000_000, device_bytes=80 * gib, world=8, local_world=8)[0] == "fsdp"
    assert choose_strategy("auto", n_params=2_000_000_000, device_bytes=80 * gib, world=1, local_world=1)[0] == "ddp"
    assert choose_strategy("fsdp", n_params=1000, device_bytes=80 * gib, world=2, local_world=2)[0] == "fsdp"
    with pytest.raises(ValueError, match="scaling.strategy"):
        choose_strategy("zero3", n_params=1000, device_bytes=gib, world=2, local_world=2)
