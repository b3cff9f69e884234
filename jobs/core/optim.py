"""Learning-rate rules and parameter groups, as small pure functions (MAE util/lr_sched.py)."""

from __future__ import annotations

import math

# torch is imported where a function steps tensors: the schedule is also read by drivers (the run's
# plan), which need no torch (2-4 s to import on a small CPU, in every Tune trial's driver).


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The paper's linear scaling rule: lr = base_lr * global_batch / 256."""
    return base_lr * global_batch / 256


def lr_at(step: int, *, peak: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Per-step linear warmup from 0, then half-cycle cosine from ``peak`` to ``min_lr``.

    ``step`` counts optimizer steps already taken (the lr used for step ``step + 1``).
    """
    if warmup > 0 and step < warmup:
        return peak * step / warmup
    if total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay as the official MAE code applies it (timm's ``add_weight_decay`` with an empty
    skip list): none on 1-D parameters (norm weights) and biases, decay on everything else,
    **including** ``cls_token`` and ``mask_token``. The sin-cos position embeddings are frozen
    (``requires_grad=False``) and so in no group."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, *, lr: float, weight_decay: float, betas, device_type: str):
    """AdamW, fused (one kernel over all parameters; it also honours :func:`guarded_step`'s flag on
    the device). ``device_type`` is kept for callers; fused runs on CPU and CUDA alike."""
    import torch
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), fused=True)


def guarded_step(opt: torch.optim.Optimizer, params, clip: float) -> torch.Tensor:
    """Clip the gradients (``clip`` > 0) and apply one optimizer step, unless they are non-finite.

    -> a device flag, 1.0 when the step was skipped. Nothing is read on the host: the global norm
    (the same on every rank, computed from the reduced gradients) decides, and the fused AdamW
    skips the update on the device when ``found_inf`` is set (the mechanism of torch's
    GradScaler), leaving weights, moments and step counts as they were. A non-finite loss gives
    non-finite gradients, so it is caught here before it can touch the weights.
    """
    import torch
    params = [p for p in params if p.grad is not None]
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor norm
        norm = norm.full_tensor()
    bad = (~torch.isfinite(norm)).float()
    opt.found_inf = bad
    opt.step()
    return bad
