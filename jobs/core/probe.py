"""Frozen-encoder probes on features: k-NN and a linear probe (pure torch, no Ray).

- k-NN: cosine similarity, k = 20, votes weighted by exp(sim / 0.07) (as in DINO and most
  self-supervised evaluations).
- Linear probe: BatchNorm without affine parameters, then a linear layer (MAE paper, App. A.2),
  trained on the frozen training features.
Both run on the two features of ``forward_features``: the cls token and the mean patch token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_top1(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
             k: int = 20, temperature: float = 0.07, num_classes: int | None = None) -> float:
    """train_f (N, D), train_y (N,), val_f (M, D), val_y (M,) -> top-1 accuracy in [0, 1]."""
    C = num_classes or int(max(train_y.max(), val_y.max())) + 1
    tr = F.normalize(train_f.float(), dim=1)
    va = F.normalize(val_f.float(), dim=1)
    k = min(k, tr.shape[0])
    correct = 0
    for i in range(0, va.shape[0], 1024):
        sim = va[i:i + 1024] @ tr.T  # (m, N)
        top, idx = sim.topk(k, dim=1)
        w = (top / temperature).exp()
        votes = torch.zeros(sim.shape[0], C).scatter_add_(1, train_y[idx].long(), w)
        correct += (votes.argmax(1) == val_y[i:i + 1024]).sum().item()
    return correct / max(1, va.shape[0])


def linear_probe_top1(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                      epochs: int = 100, lr: float = 0.1, num_classes: int | None = None, seed: int = 0) -> float:
    """BatchNorm(affine=False) + Linear on frozen features, full-batch SGD with momentum + cosine."""
    C = num_classes or int(max(train_y.max(), val_y.max())) + 1
    g = torch.Generator().manual_seed(seed)
    D = train_f.shape[1]
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(D, affine=False), torch.nn.Linear(D, C))
    with torch.no_grad():
        head[1].weight.normal_(0, 0.01, generator=g)  # as the MAE linear probe (trunc_normal 0.01)
        head[1].bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    x, y = train_f.float(), train_y.long()
    head.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for j in range(0, x.shape[0], 256):
            b = perm[j:j + 256]
            if b.numel() < 2:
                continue
            loss = F.cross_entropy(head(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    head.eval()
    with torch.no_grad():
        return (head(val_f.float()).argmax(1) == val_y).float().mean().item()


@torch.no_grad()
def features(model, patches: torch.Tensor, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """patches uint8 (N, L, D) on the model's device -> {"cls", "mean"} float32 (N, E) on CPU.
    Under FSDP every rank must call this with the same number of batches."""
    out = {"cls": [], "mean": []}
    was_training = model.training
    model.eval()
    for i in range(0, patches.shape[0], batch_size):
        f = model.forward_features(patches[i:i + batch_size])
        for kk in out:
            out[kk].append(f[kk].float().cpu())
    model.train(was_training)
    return {kk: torch.cat(v) for kk, v in out.items()}


@torch.no_grad()
def sharded_features(model, patches: torch.Tensor, rank: int, world: int) -> dict[str, torch.Tensor]:
    """patches uint8 (N, L, D), the same on every rank -> {"cls", "mean"} float32 (N, E) on CPU,
    on every rank. Each rank embeds its own 1/world of the images (padded to equal chunks, so every
    rank makes the same forward calls, which FSDP's collectives need); the features are then
    all-gathered."""
    import torch.distributed as dist
    n = patches.shape[0]
    per = -(-n // world)
    mine = patches[rank * per:(rank + 1) * per]
    short = per - mine.shape[0]
    if short:  # the last ranks' chunks are short (or empty): pad with copies of an image
        mine = torch.cat([mine, patches[:1].expand(short, *patches.shape[1:])])
    f = features(model, mine)
    out = {}
    for kind, v in f.items():
        t = v.to(patches.device)
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        real = [max(0, min(per, n - r * per)) for r in range(world)]
        out[kind] = torch.cat([p[:k] for p, k in zip(parts, real)]).cpu()
    return out


def evaluate_features(train: dict, train_y, val: dict, val_y, num_classes=None, linear: bool = True) -> dict:
    res = {}
    for kind in ("cls", "mean"):
        res[f"knn_top1/{kind}"] = knn_top1(train[kind], train_y, val[kind], val_y, num_classes=num_classes)
        if linear:
            res[f"linear_top1/{kind}"] = linear_probe_top1(train[kind], train_y, val[kind], val_y,
                                                            num_classes=num_classes)
    return res


# ---------------------------------------------------------------------------- the paper's linear probe
class LARS(torch.optim.Optimizer):
    """LARS as the official MAE code's ``util/lars.py`` (from MoCo v3): momentum SGD whose update of
    every >1-D parameter is scaled by ``trust_coefficient * |w| / |g + wd * w|``; no weight decay
    and no scaling for biases and norm parameters."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, g["trust_coefficient"] * param_norm / update_norm, one),
                                    one)
                    dp = dp.mul(q)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def linear_head(dim: int, num_classes: int, seed: int = 0) -> torch.nn.Module:
    """``main_linprobe.py``'s head: BatchNorm1d(affine=False, eps=1e-6) + Linear, weights
    trunc-normal std 0.01, bias 0."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(dim, affine=False, eps=1e-6), torch.nn.Linear(dim, num_classes))
    with torch.no_grad():
        w = torch.empty_like(head[1].weight)
        torch.nn.init.trunc_normal_(w, std=0.01, generator=g)
        head[1].weight.copy_(w)
        head[1].bias.zero_()
    return head


def probe_lr(epoch: float, *, lr: float, warmup_epochs: float, epochs: float, min_lr: float = 0.0) -> float:
    """``util/lr_sched.adjust_learning_rate``: per iteration (fractional epoch), linear warmup then
    half-cycle cosine."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))
