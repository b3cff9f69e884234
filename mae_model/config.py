"""MAE configuration and named presets.

Field names and presets follow the official ``models_mae.py`` (facebookresearch/mae) so that
people coming from it find the same words: ``mae_vit_base_patch16`` etc.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


@dataclass
class MAEConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    # Normalized pixels per patch as the target: the paper's final models (Table 1d).
    norm_pix_loss: bool = True
    norm_eps: float = 1e-6  # official LayerNorm eps (HF ViTMAE defaults to 1e-12)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: ``p * p * in_chans`` in ``(p, q, c)`` order."""
        return self.patch_size**2 * self.in_chans

    @property
    def len_keep(self) -> int:
        """Visible patches per image, exactly as the official ``random_masking``."""
        return int(self.num_patches * (1 - self.mask_ratio))

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "num_heads",
                     "decoder_embed_dim", "decoder_num_heads"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 f"{name}={v!r}: must be a positive integer")
        need(self.in_chans == 3, f"in_chans={self.in_chans}: only RGB (3) input is supported")
        need(self.img_size % self.patch_size == 0,
             f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}: "
             f"pick an img_size that is a multiple of {self.patch_size}")
        need(isinstance(self.depth, int) and self.depth >= 1,
             f"depth={self.depth!r}: the encoder needs at least 1 block")
        need(isinstance(self.decoder_depth, int) and self.decoder_depth >= 1,
             f"decoder_depth={self.decoder_depth!r}: the decoder needs at least 1 block")
        need(self.embed_dim % self.num_heads == 0,
             f"num_heads={self.num_heads} does not divide embed_dim={self.embed_dim}: "
             f"choose a head count that divides the width")
        need(self.decoder_embed_dim % self.decoder_num_heads == 0,
             f"decoder_num_heads={self.decoder_num_heads} does not divide "
             f"decoder_embed_dim={self.decoder_embed_dim}: choose a head count that divides the width")
        # 2-D sin-cos embeddings split the width in 4 (sin/cos for each of 2 axes).
        need(self.embed_dim % 4 == 0, f"embed_dim={self.embed_dim}: must be a multiple of 4 "
             "(2-D sin-cos position embeddings)")
        need(self.decoder_embed_dim % 4 == 0, f"decoder_embed_dim={self.decoder_embed_dim}: must be "
             "a multiple of 4 (2-D sin-cos position embeddings)")
        need(isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0,
             f"mlp_ratio={self.mlp_ratio!r}: must be > 0")
        need(isinstance(self.mask_ratio, (int, float)) and 0 < self.mask_ratio < 1,
             f"mask_ratio={self.mask_ratio!r}: must be strictly between 0 and 1 (the paper uses 0.75)")
        need(self.num_patches >= 2 and self.len_keep >= 1,
             f"mask_ratio={self.mask_ratio} leaves no visible patch out of {self.num_patches}: "
             "lower the mask ratio or use smaller patches")

    # ------------------------------------------------------------------ helpers
    def replace(self, **changes) -> "MAEConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    # ------------------------------------------------------------------ FLOPs
    def train_flops_per_image(self) -> float:
        """Matmul FLOPs for one training step of one image (fwd + bwd = 3 x forward).

        2 FLOPs per multiply-add; per block with n tokens of width d: ``24*n*d^2 + 4*n^2*d``
        (qkv, proj and the 4x MLP, plus the two attention matmuls). The encoder runs on the
        visible patches + cls, the decoder on all patches + cls; the patch embedding,
        decoder_embed and decoder_pred are counted too.
        """
        n_enc = self.len_keep + 1
        n_dec = self.num_patches + 1
        d, dd = self.embed_dim, self.decoder_embed_dim
        r = self.mlp_ratio

        def block(n: int, w: int) -> float:
            return 2 * n * w * w * (3 + 1 + 2 * r) + 4 * n * n * w

        fwd = 2 * self.num_patches * self.patch_dim * d  # patch embed: all patches, before masking
        fwd += self.depth * block(n_enc, d)
        fwd += 2 * n_enc * d * dd                     # decoder_embed
        fwd += self.decoder_depth * block(n_dec, dd)
        fwd += 2 * n_dec * dd * self.patch_dim        # decoder_pred
        return 3.0 * fwd


# How the model is spread over the workers (``scaling.strategy``; applied by ``mae_model.parallelize``).
# Here, beside the configs, so that checking a config never imports torch (the `mae tune` driver and
# its trials' drivers load configs and may need nothing else of torch).
STRATEGIES = ("auto", "fsdp", "hsdp", "ddp")


def _preset(**kw) -> MAEConfig:
    return MAEConfig(**kw)


# Official presets (models_mae.py): decoder 512 wide, 8 deep, 16 heads, MLP ratio 4.
def mae_vit_base_patch16(**overrides) -> MAEConfig:
    return _preset(**{**dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), **overrides})


def mae_vit_large_patch16(**overrides) -> MAEConfig:
    return _preset(**{**dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), **overrides})


def mae_vit_huge_patch14(**overrides) -> MAEConfig:
    return _preset(**{**dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), **overrides})


# Small presets for tests and the CPU demo.
def mae_vit_tiny_patch16(**overrides) -> MAEConfig:
    """ViT-Ti encoder (192/12/3) with a light decoder; 224 px like the paper."""
    return _preset(**{**dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                             decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4),
                      **overrides})


def mae_vit_micro_patch4(**overrides) -> MAEConfig:
    """A 32-px model that trains in seconds on a CPU: for tests and the demo."""
    return _preset(**{**dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                             decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4),
                      **overrides})


PRESETS = {
    "mae_vit_base_patch16": mae_vit_base_patch16,
    "mae_vit_large_patch16": mae_vit_large_patch16,
    "mae_vit_huge_patch14": mae_vit_huge_patch14,
    "mae_vit_tiny_patch16": mae_vit_tiny_patch16,
    "mae_vit_micro_patch4": mae_vit_micro_patch4,
}


def get_preset(name: str, **overrides) -> MAEConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
