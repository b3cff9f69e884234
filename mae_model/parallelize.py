"""FSDP2 for the MAE, applied from outside the model (torchtitan's ``parallelize`` pattern)."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

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
    blocks = [*model.blocks, *model.decoder_blocks]
    for i, blk in enumerate(blocks):
        # The last block's params are needed again at once by backward: keep them unsharded.
        fully_shard(blk, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    # The feature path (evaluation, probes) must unshard the root params like forward does.
    register_fsdp_forward_method(model, "forward_features")
    return model
