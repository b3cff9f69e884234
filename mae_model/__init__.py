"""The Masked Autoencoder: config + presets, model, official-layout interop.

``parallelize`` (FSDP2) lives in ``mae_model.parallelize`` and is imported on demand, so that
this package imports without ``torch.distributed``.
"""

from .config import (PRESETS, ConfigError, MAEConfig, get_preset, mae_vit_base_patch16,
                     mae_vit_huge_patch14, mae_vit_large_patch16, mae_vit_micro_patch4,
                     mae_vit_tiny_patch16)
from .model import MaskedAutoencoder, num_params
from .official import (OfficialLayoutError, load_official_state_dict, to_official_state_dict)

__all__ = [
    "MAEConfig", "ConfigError", "MaskedAutoencoder", "PRESETS", "get_preset", "num_params",
    "mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14",
    "mae_vit_tiny_patch16", "mae_vit_micro_patch4",
    "load_official_state_dict", "to_official_state_dict", "OfficialLayoutError",
]
