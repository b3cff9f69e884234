"""FSDP2 over gloo with 2 CPU processes against the unsharded model in one process."""

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


def _worker(rank, world, port, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = mae_vit_micro_patch4()
    model = _reference_model(cfg)  # same init on every rank, then sharded in place
    parallelize(model)
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    opt = _opt(model)
    xs, noise = _data(cfg)
    per = B // world
    losses = []
    for x, n in zip(xs, noise):
        sl = slice(rank * per, (rank + 1) * per)
        loss, _, _ = model(x[sl], noise=n[sl])
        loss.backward()
        opt.step()
        opt.zero_grad()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / world)
    # the k-NN probe's features: each rank embeds its share (7 images: 4 + 3, padded), all get all
    from jobs.core.probe import sharded_features
    embedded = []
    forward_features = model.forward_features
    model.forward_features = lambda x: (embedded.append(x.shape[0]), forward_features(x))[1]
    probe = torch.randint(0, 256, (7, cfg.num_patches, cfg.patch_dim), generator=torch.Generator().manual_seed(3),
                          dtype=torch.uint8)
    feats = sharded_features(model, probe, rank, world)
    model.forward_features = forward_features
    if rank == 0:
        torch.save({"losses": losses, "feats": feats}, out_path)
    torch.save({"local": local, "total": total, "embedded": sum(embedded)}, f"{out_path}.{rank}")
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_fsdp2_two_ranks_match_unsharded(tmp_path):
    cfg = mae_vit_micro_patch4()
    model = _reference_model(cfg)
    opt = _opt(model)
    xs, noise = _data(cfg)
    ref = []
    for x, n in zip(xs, noise):
        loss, _, _ = model(x, noise=n)
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref.append(loss.item())

    out = str(tmp_path / "fsdp.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    got = torch.load(out)["losses"]
    print("unsharded:", ref, "\nfsdp2 x2:", got)
    for a, b in zip(ref, got):
        assert abs(a - b) / abs(a) < 1e-5
    assert ref[-1] < ref[0]  # the steps really trained
    shards = [torch.load(f"{out}.{r}") for r in range(2)]
    total = shards[0]["total"]
    assert sum(s["local"] for s in shards) == total
    for s in shards:
        assert abs(s["local"] / total - 0.5) < 0.02
        assert s["embedded"] == 4  # its share of the 7 probe images (padded), not all 7
    from jobs.core.probe import features
    probe = torch.randint(0, 256, (7, cfg.num_patches, cfg.patch_dim), generator=torch.Generator().manual_seed(3),
                          dtype=torch.uint8)
    want = features(model, probe)  # the trained unsharded model
    feats = torch.load(out)["feats"]
    for kind in ("cls", "mean"):
        assert feats[kind].shape == want[kind].shape
        assert torch.allclose(feats[kind], want[kind], atol=1e-4, rtol=1e-4), kind
