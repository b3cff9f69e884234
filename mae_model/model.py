"""The Masked Autoencoder (He et al., 2021), numerically as the official ``models_mae.py``.

Differences in *form* only:
- input is the pipeline's patches ``[B, L, p*p*3]`` (uint8 or float, ``(p, q, c)`` order) rather
  than images; ImageNet normalization happens here, on the device;
- the patch embedding is a Linear over ``p*p*3`` (the official Conv2d maps onto it, see
  ``official.py``);
- attention uses ``scaled_dot_product_attention``;
- the model can be built on the meta device and materialized by ``init_weights()``.

This file never imports ``torch.distributed``: parallelism is applied from outside
(``parallelize.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import MAEConfig
from .pos_embed import get_2d_sincos_pos_embed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D)"""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, D/H)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(D/H)) v
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm 0.3.2 ``Block`` as used by the official code)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # stochastic depth (fine-tuning): timm's DropPath, as the official models_vit.py blocks
        self.drop_path = nn.Identity()
        if drop_path > 0:
            from pipeline.private_api import import_timm  # timm without wandb's temp dirs
            self.drop_path = import_timm("timm.layers").DropPath(drop_path)
        self.activation_checkpointing = False

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class PatchEmbed(nn.Module):
    """Linear over flattened ``(p, q, c)`` patches; the official Conv2d, viewed as a Linear."""

    def __init__(self, patch_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(patch_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MaskedAutoencoder(nn.Module):
    def __init__(self, config: MAEConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        self.patch_embed = PatchEmbed(c.patch_dim, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.blocks = nn.ModuleList(
            [Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.norm_eps) for _ in range(c.depth)])
        self.norm = nn.LayerNorm(c.embed_dim, eps=c.norm_eps)

        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            [Block(c.decoder_embed_dim, c.decoder_num_heads, c.mlp_ratio, c.norm_eps)
             for _ in range(c.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(c.decoder_embed_dim, eps=c.norm_eps)
        self.decoder_pred = nn.Linear(c.decoder_embed_dim, c.patch_dim)

        # Fixed (not learned) tables and normalization constants: buffers, recomputed by
        # init_weights(), so they need no checkpointing and no sharding.
        L = c.num_patches
        self.register_buffer("pos_embed", torch.zeros(1, L + 1, c.embed_dim), persistent=False)
        self.register_buffer("decoder_pos_embed", torch.zeros(1, L + 1, c.decoder_embed_dim),
                             persistent=False)
        self.register_buffer("pixel_mean", torch.zeros(c.patch_dim), persistent=False)
        self.register_buffer("pixel_std", torch.ones(c.patch_dim), persistent=False)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_buffers(self) -> None:
        c = self.config
        dev = self.pos_embed.device
        self.pos_embed.copy_(get_2d_sincos_pos_embed(c.embed_dim, c.grid_size, True)[None].to(dev))
        self.decoder_pos_embed.copy_(
            get_2d_sincos_pos_embed(c.decoder_embed_dim, c.grid_size, True)[None].to(dev))
        # (p, q, c) order: the channel is the fastest-moving index.
        reps = c.patch_size**2
        self.pixel_mean.copy_(torch.tensor(IMAGENET_MEAN).repeat(reps).to(dev))
        self.pixel_std.copy_(torch.tensor(IMAGENET_STD).repeat(reps).to(dev))

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official initialization. Works on materialized (``to_empty``) or sharded params.

        xavier-uniform for every Linear (the patch embedding included: the official code views
        its conv weight as ``[D, 3*p*p]``, whose fan-in/fan-out are the same as our Linear's),
        zero biases, normal(0.02) for cls and mask tokens, LayerNorm weight 1 / bias 0.
        """
        self.init_buffers()
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        init_linears_and_norms(self)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        for blk in [*self.blocks, *self.decoder_blocks]:
            blk.activation_checkpointing = enabled

    # ------------------------------------------------------------------ pieces
    def normalize(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: (B, L, p*p*3) uint8 in [0, 255] or float in [0, 1] -> ImageNet-normalized float."""
        x = patches.float()
        if patches.dtype == torch.uint8:
            x = x / 255.0
        return (x - self.pixel_mean) / self.pixel_std

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Per-sample random masking by argsort of noise (official semantics).

        x: (B, L, D), noise: (B, L) in any range; the patches with the *smallest* noise are kept.
        -> x_masked (B, len_keep, D), mask (B, L) with 1 = masked, ids_restore (B, L)
        """
        B, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(B, L, device=x.device)
        elif noise.shape != (B, L):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(B, L)}")
        ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        mask = torch.ones(B, L, device=x.device, dtype=torch.float32)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """x: normalized patches (B, L, p*p*3) -> latent (B, 1+len_keep, D), mask, ids_restore"""
        # Under mixed precision the params may be bf16 while the normalized input is fp32.
        x = self.patch_embed(x.to(self.patch_embed.proj.weight.dtype))  # all patches, before masking
        x = x + self.pos_embed[:, 1:, :].to(x.dtype)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        x = torch.cat([self._cls(x), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def _cls(self, x: torch.Tensor) -> torch.Tensor:
        """cls token + its (zero) position, expanded to x's batch: (B, 1, D)."""
        return (self.cls_token + self.pos_embed[:, :1, :]).to(x.dtype).expand(x.shape[0], -1, -1)

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """x: (B, 1+len_keep, D), ids_restore: (B, L) -> pred (B, L, p*p*3)"""
        x = self.decoder_embed(x)
        B, n, Dd = x.shape
        L = ids_restore.shape[1]
        mask_tokens = self.mask_token.to(x.dtype).expand(B, L + 1 - n, -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        # Predict the patch tokens only (drop cls first: same numbers, a fresh tensor, not a view).
        return self.decoder_pred(self.decoder_norm(x)[:, 1:, :])

    def loss_target(self, target: torch.Tensor) -> torch.Tensor:
        """target: normalized patches (B, L, p*p*3) -> the regression target (norm_pix if set)."""
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE per patch, averaged over masked patches only. All (B, L, ...)."""
        loss = ((pred.float() - self.loss_target(target)) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    # ------------------------------------------------------------------ API
    def forward(self, patches: torch.Tensor, mask_ratio: float | None = None,
                noise: torch.Tensor | None = None):
        """patches: (B, L, p*p*3) -> (loss, pred (B, L, p*p*3), mask (B, L), 1 = masked)."""
        mask_ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        x = self.normalize(patches)
        latent, mask, ids_restore = self.forward_encoder(x, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(x, pred, mask)
        return loss, pred, mask

    def forward_features(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encoder on all patches, no masking: patches (B, L, p*p*3) ->
        {"cls": (B, D), "mean": (B, D)} (cls token; mean of the patch tokens), after the final norm.
        """
        x = self.patch_embed(self.normalize(patches).to(self.patch_embed.proj.weight.dtype))
        x = x + self.pos_embed[:, 1:, :].to(x.dtype)
        x = torch.cat([self._cls(x), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return {"cls": x[:, 0], "mean": x[:, 1:].mean(dim=1)}

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalized patches (B, L, p*p*3) -> pixels in [0, 1]."""
        return (x.float() * self.pixel_std + self.pixel_mean).clamp(0, 1)


@torch.no_grad()
def init_linears_and_norms(module: nn.Module) -> None:
    """The official init of every Linear (xavier-uniform, zero bias) and LayerNorm (1, 0) in ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
