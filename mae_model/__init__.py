"""The Masked Autoencoder: config + presets, model, official-layout interop.

``parallelize`` (FSDP2) lives in ``mae_model.parallelize`` and is imported on demand, so that
this package imports without ``torch.distributed``.
"""

from .config import (PRESETS, ConfigError, MAEConfig, get_preset, mae_vit_base_patch16,
                     mae_vit_huge_patch14, mae_vit_large_patch16, mae_vit_micro_patch4,
                     mae_vit_tiny_patch16)

# The model and the official-layout interop need torch (~2 s to import): loaded on first use, so
# that what only reads configs (`mae ckpt list`, `mae jobs`, `mae submit`) starts without it.
_LAZY = {"MaskedAutoencoder": "model", "num_params": "model", "load_official_state_dict": "official",
         "to_official_state_dict": "official", "OfficialLayoutError": "official"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MAEConfig", "ConfigError", "MaskedAutoencoder", "PRESETS", "get_preset", "num_params",
    "mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14",
    "mae_vit_tiny_patch16", "mae_vit_micro_patch4",
    "load_official_state_dict", "to_official_state_dict", "OfficialLayoutError",
]
