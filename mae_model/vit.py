"""The MAE encoder as an image classifier, numerically as the official ``models_vit.py`` (timm's
``VisionTransformer`` with ``global_pool``), for fine-tuning and linear probing.

- Input: ImageNet-normalized patches ``(B, L, p*p*3)`` in the pipeline's ``(p, q, c)`` order (the
  official Conv2d patch embedding is this Linear, see ``official.conv_to_linear``).
- ``global_pool=True`` (the fine-tuning default): mean of the patch tokens, then ``fc_norm``; the
  encoder's final ``norm`` is dropped, as the official code deletes it. ``False``: ``norm`` then
  the cls token.
- ``pos_embed`` is a learned parameter here (timm's), started from the fixed sin-cos table the MAE
  was pretrained with; interpolated (bicubic) when a checkpoint's grid differs.
- Head: ``Linear`` with ``trunc_normal_(std=2e-5)`` weights (fine-tuning), or for the linear probe
  ``BatchNorm1d(affine=False, eps=1e-6) + Linear`` with std 0.01 (``main_linprobe.py``).
- Stochastic depth rising linearly over the blocks to ``drop_path`` (timm's ``dpr``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MAEConfig
from .model import Block, PatchEmbed, init_linears_and_norms
from .pos_embed import get_2d_sincos_pos_embed

# Never weight-decayed, whatever their shape (timm VisionTransformer.no_weight_decay()).
NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "dist_token")


class ViTClassifier(nn.Module):
    def __init__(self, config: MAEConfig, num_classes: int, *, global_pool: bool = True, drop_path: float = 0.0,
                 linprobe: bool = False):
        super().__init__()
        config.validate()
        self.config = c = config
        self.num_classes, self.global_pool, self.linprobe = num_classes, global_pool, linprobe
        self.patch_embed = PatchEmbed(c.patch_dim, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.embed_dim))
        dpr = [x.item() for x in torch.linspace(0, drop_path, c.depth, device="cpu")]
        self.blocks = nn.ModuleList([Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.norm_eps, drop_path=dpr[i])
                                     for i in range(c.depth)])
        if global_pool:
            self.fc_norm = nn.LayerNorm(c.embed_dim, eps=c.norm_eps)
        else:
            self.norm = nn.LayerNorm(c.embed_dim, eps=c.norm_eps)
        linear = nn.Linear(c.embed_dim, num_classes)
        self.head = (nn.Sequential(nn.BatchNorm1d(c.embed_dim, affine=False, eps=1e-6), linear)
                     if linprobe else linear)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ init
    def head_linear(self) -> nn.Linear:
        return self.head[1] if self.linprobe else self.head

    @torch.no_grad()
    def init_weights(self) -> None:
        """As the MAE's initialization (xavier Linears, zero biases, LayerNorm 1/0, cls normal .02,
        the sin-cos position table), then the official head init: trunc-normal std 2e-5 (0.01 for
        the linear probe), zero bias. Works on materialized (``to_empty``) or sharded params."""
        c = self.config
        table = get_2d_sincos_pos_embed(c.embed_dim, c.grid_size, True)[None].to(self.pos_embed.device,
                                                                                self.pos_embed.dtype)
        if hasattr(self.pos_embed, "device_mesh"):  # sharded by FSDP2: each rank keeps its part
            from .parallelize import copy_full_
            copy_full_(self.pos_embed, table)
        else:
            self.pos_embed.copy_(table)
        nn.init.normal_(self.cls_token, std=0.02)
        init_linears_and_norms(self)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.reset_running_stats()
        self.init_head()

    @torch.no_grad()
    def init_head(self) -> None:
        head = self.head_linear()
        nn.init.trunc_normal_(head.weight, std=0.01 if self.linprobe else 2e-5)
        nn.init.zeros_(head.bias)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        for blk in self.blocks:
            blk.activation_checkpointing = enabled

    def freeze_encoder(self) -> None:
        """The linear probe: only the head trains (``main_linprobe.py``)."""
        for n, p in self.named_parameters():
            p.requires_grad = n.startswith("head.")

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: normalized patches (B, L, p*p*3) -> pooled features (B, D)."""
        return self._features(x)

    # (forward calls this, not forward_features: FSDP2 registers forward_features as a forward
    # method of its own, which reshards the root's params, the head's among them, when it returns)
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x.to(self.patch_embed.proj.weight.dtype))
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        if self.global_pool:
            return self.fc_norm(x[:, 1:, :].mean(dim=1))
        return self.norm(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: normalized patches (B, L, p*p*3) -> logits (B, num_classes), float32."""
        f = self._features(x)
        if self.linprobe:
            f = f.float()
        return self.head(f.to(self.head_linear().weight.dtype)).float()

    # ------------------------------------------------------------------ weights
    def load_pretrained(self, sd: dict[str, torch.Tensor]) -> list[str]:
        """A pretrained MAE's weights (our layout or the official one, full or encoder-only: the
        decoder is ignored) -> this model, as ``main_finetune.py`` does: a classifier head of another
        shape is dropped, ``pos_embed`` interpolated to this grid (absent: the sin-cos table stays),
        then loaded non-strictly. -> the missing keys, which must be the head's (and ``fc_norm``'s
        under global pooling), else ValueError naming them."""
        sd = dict(sd)
        if sd.get("patch_embed.proj.weight") is not None and sd["patch_embed.proj.weight"].dim() == 4:
            from .official import conv_to_linear
            sd["patch_embed.proj.weight"] = conv_to_linear(sd["patch_embed.proj.weight"])
        own = self.state_dict()
        for k in ("head.weight", "head.bias"):
            if k in sd and (k not in own or sd[k].shape != own[k].shape):
                del sd[k]
        if "pos_embed" in sd:
            sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], self.config.num_patches)
        sd = {k: v for k, v in sd.items() if k in own}  # the decoder, mask token, a dropped norm
        for k, v in sd.items():
            if v.shape != own[k].shape:
                raise ValueError(f"{k}: checkpoint has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}: "
                                 "pick the model preset the checkpoint was pretrained with")
        missing = sorted(set(own) - set(sd) - {"pos_embed"})
        allowed = {"head.weight", "head.bias", "head.1.weight", "head.1.bias", "head.0.running_mean",
                   "head.0.running_var", "head.0.num_batches_tracked", "fc_norm.weight", "fc_norm.bias"}
        if set(missing) - allowed:
            raise ValueError(f"the checkpoint lacks encoder weights {sorted(set(missing) - allowed)[:4]}: "
                             "is it an MAE checkpoint of this preset?")
        with torch.no_grad():
            for k, v in sd.items():
                own[k].copy_(v.to(own[k].dtype))
        return missing


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int, num_extra_tokens: int = 1) -> torch.Tensor:
    """The official ``util/pos_embed.interpolate_pos_embed``: a (1, extra + h*w, D) table -> (1,
    extra + num_patches, D), its patch part resized bicubically on the square grid (unchanged when
    the grids agree)."""
    D = pos_embed.shape[-1]
    orig = int((pos_embed.shape[-2] - num_extra_tokens) ** 0.5)
    new = int(num_patches ** 0.5)
    if orig == new:
        return pos_embed
    extra, tokens = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    tokens = tokens.reshape(-1, orig, orig, D).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens.float(), size=(new, new), mode="bicubic", align_corners=False)
    tokens = tokens.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([extra, tokens], dim=1)


# ---------------------------------------------------------------------------- layer-wise lr decay
def layer_id(name: str, num_layers: int) -> int:
    """``util/lr_decay.get_layer_id_for_vit``: embeddings 0, block i -> i + 1, the rest (final
    norms, head) ``num_layers``."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: nn.Module, weight_decay: float = 0.05, layer_decay: float = 0.75,
                     no_weight_decay=NO_WEIGHT_DECAY, with_names: bool = False) -> list[dict]:
    """``util/lr_decay.param_groups_lrd``: one group per (layer, decay or not), ``lr_scale`` =
    ``layer_decay ** (num_layers - layer)`` with ``num_layers = depth + 1``; no weight decay on 1-D
    parameters (norms, biases) and on ``no_weight_decay`` names. Frozen parameters are left out.
    Parameter names are read through FSDP/DDP wrappers (``module.`` prefixes dropped)."""
    num_layers = len(model_blocks(model)) + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        n = n.removeprefix("module.")
        decay = not (p.ndim == 1 or n in no_weight_decay)
        lid = layer_id(n, num_layers)
        g = groups.setdefault(f"layer_{lid}_{'decay' if decay else 'no_decay'}",
                              {"lr_scale": scales[lid], "weight_decay": weight_decay if decay else 0.0,
                               "params": [], "names": []})
        g["params"].append(p)
        g["names"].append(n)
    return [g if with_names else {k: v for k, v in g.items() if k != "names"} for g in groups.values()]


def model_blocks(model: nn.Module):
    return model.module.blocks if hasattr(model, "module") else model.blocks


def accuracy(logits: torch.Tensor, target: torch.Tensor, topk=(1, 5)) -> list[torch.Tensor]:
    """Counts of correct top-k predictions (timm's ``accuracy``, as counts not percentages, so that
    they sum over ranks). logits (B, C), target (B,) -> [count for k in topk]."""
    k = min(max(topk), logits.shape[1])
    pred = logits.topk(k, dim=1).indices  # (B, k)
    hit = pred.eq(target[:, None])
    return [hit[:, :min(t, k)].any(dim=1).sum() for t in topk]


def flops_per_image(config: MAEConfig, num_classes: int) -> float:
    """Training FLOPs of one image through the classifier (forward + backward = 3x forward): the
    encoder on all L+1 tokens."""
    c = config
    n, w = c.num_patches + 1, c.embed_dim
    block = 2 * n * (4 * w * w + 2 * w * int(w * c.mlp_ratio)) + 4 * n * n * w
    return 3.0 * (c.depth * block + 2 * c.num_patches * c.patch_dim * w + 2 * w * num_classes)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["ViTClassifier", "interpolate_pos_embed", "param_groups_lrd", "layer_id", "accuracy",
           "NO_WEIGHT_DECAY", "flops_per_image", "count_params"]
