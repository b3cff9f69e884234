"""FSDP2 for the MAE, applied from outside the model (torchtitan's ``parallelize`` pattern)."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from .config import STRATEGIES
from .model import MaskedAutoencoder


def mixed_precision(param_dtype: torch.dtype | str | None) -> MixedPrecisionPolicy | None:
    """bf16 params/compute with fp32 gradient reduction, or None (plain fp32)."""
    if isinstance(param_dtype, str):
        param_dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                       "fp32": None, "float32": None}[param_dtype]
    if param_dtype in (None, torch.float32):
        return None
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def parallelize(model: MaskedAutoencoder, mesh: DeviceMesh | None = None, *,
                mp_policy: MixedPrecisionPolicy | None = None,
                activation_checkpointing: bool = False,
                reshard_after_forward: bool = True) -> MaskedAutoencoder:
    """Shard every encoder and decoder block, then the root (patch embed, tokens, norms, heads).

    Call on a model built on the meta device, then ``model.to_empty(device=...)`` and
    ``model.init_weights()``: no rank ever holds the whole unsharded model.
    """
    if activation_checkpointing:
        model.set_activation_checkpointing(True)
    kw = {"mesh": mesh}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    blocks = [*model.blocks, *getattr(model, "decoder_blocks", [])]
    for i, blk in enumerate(blocks):
        # The last block's params are needed again at once by backward: keep them unsharded.
        fully_shard(blk, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    # The feature path (evaluation, probes) must unshard the root params like forward does.
    register_fsdp_forward_method(model, "forward_features")
    return model


def compile_blocks(model: MaskedAutoencoder, backend: str = "inductor") -> MaskedAutoencoder:
    """``torch.compile`` each transformer block (encoder and decoder), in place, before sharding
    (torchtitan's order: FSDP2's hooks stay outside the compiled regions). Identical blocks share
    one compiled graph. Masking, gathers and the loss stay eager."""
    for blk in [*model.blocks, *getattr(model, "decoder_blocks", [])]:
        blk.compile(backend=backend)
    return model


# ---------------------------------------------------------------------------- strategies
STATE_BYTES_PER_PARAM = 16  # fp32 parameter + gradient + AdamW's two moments
FIT_SHARE = 0.25            # the rest of the device is for activations, buffers, the allocator


def choose_strategy(strategy: str, *, n_params: int, device_bytes: int, world: int,
                    local_world: int) -> tuple[str, str]:
    """The parallelism for a run -> (strategy, why), one of ``fsdp | hsdp | ddp``.

    ``auto``: replicate (DDP: one bucketed all-reduce per step, no all-gathers) when parameters,
    gradients and AdamW state fit in a quarter of one device, as ViT-B and ViT-L do on 80 GB cards;
    else shard within a node and replicate across nodes (HSDP: the all-gathers stay on NVLink)
    when a node's share fits; else shard over every worker (FSDP).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"scaling.strategy={strategy!r}: choose one of {', '.join(STRATEGIES)}")
    state = STATE_BYTES_PER_PARAM * n_params
    size = f"{n_params / 1e6:.1f}M params, {state / 2**30:.2f} GiB of weights, gradients and AdamW state"
    if strategy != "auto":
        return strategy, f"scaling.strategy={strategy} ({size})"
    if world == 1:
        return "ddp", f"auto: {size}; one worker: nothing to shard or reduce"
    budget = FIT_SHARE * device_bytes
    if state <= budget:
        return "ddp", f"auto: {size} fit in a quarter of one device's {device_bytes / 2**30:.0f} GiB: replicated"
    multi_node = world > local_world and world % local_world == 0
    if multi_node and state / local_world <= budget:
        return "hsdp", (f"auto: {size}; sharded over the {local_world} workers of a node, replicated across "
                        f"{world // local_world} nodes")
    return "fsdp", f"auto: {size} do not fit one device's quarter: sharded over all {world} workers"


def replicate(model: MaskedAutoencoder, device: torch.device) -> torch.nn.Module:
    """DDP: every rank holds the whole model; gradients are all-reduced in buckets, overlapped with
    backward. Rank 0's initial weights are broadcast to the others by the constructor."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel
    # The model's buffers are constants: synced once at init, never per forward (the keyword
    # changed name in torch 2.14).
    no_resync = ({"forward_sync_buffers": False}
                 if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                 else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, **no_resync)


def unwrap(model: torch.nn.Module) -> MaskedAutoencoder:
    """The MaskedAutoencoder inside a DDP wrapper (FSDP2 and plain models are their own)."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def set_gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Gradient reduction on (the last micro-batch of a step) or off (the ones before it)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    elif isinstance(model, DistributedDataParallel):
        model.require_backward_grad_sync = enabled  # what DDP.no_sync() toggles


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy an unsharded tensor into ``param``, an FSDP2-sharded parameter (a DTensor: each rank
    keeps its shard of ``full``) or a plain one."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(param, DTensor):
        full = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)
    param.copy_(full)
