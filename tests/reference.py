"""Reference functions of the official MAE code the tests compare the project with (never used by
the project): patch layouts, and the fine-tuning recipe's parameter groups, schedule and position
embedding interpolation.

``official_patchify`` / ``official_unpatchify``: the official MAE code's (facebookresearch/mae,
``models_mae.py``), verbatim but for ``p`` as an argument instead of ``self.patch_embed``.
``patchify_hwc`` / ``unpatchify_hwc``: the same layout from HWC numpy images (what PIL gives), a
plain reshape + transpose.
"""

from __future__ import annotations

import numpy as np
import torch


def official_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """
    imgs: (N, 3, H, W)
    x: (N, L, patch_size**2 *3)
    """
    assert imgs.shape[2] == imgs.shape[3] and imgs.shape[2] % p == 0

    h = w = imgs.shape[2] // p
    x = imgs.reshape(shape=(imgs.shape[0], 3, h, p, w, p))
    x = torch.einsum('nchpwq->nhwpqc', x)
    x = x.reshape(shape=(imgs.shape[0], h * w, p**2 * 3))
    return x


def official_unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """
    x: (N, L, patch_size**2 *3)
    imgs: (N, 3, H, W)
    """
    h = w = int(x.shape[1]**.5)
    assert h * w == x.shape[1]

    x = x.reshape(shape=(x.shape[0], h, w, p, p, 3))
    x = torch.einsum('nhwpqc->nchpwq', x)
    imgs = x.reshape(shape=(x.shape[0], 3, h * p, h * p))
    return imgs


def patchify_hwc(img: np.ndarray, p: int) -> np.ndarray:
    """img: (H, W, C) or (N, H, W, C) -> (L, p*p*C) or (N, L, p*p*C), L = (H/p)*(W/p)."""
    batched = img.ndim == 4
    x = img if batched else img[None]
    n, H, W, C = x.shape
    h, w = H // p, W // p
    x = x.reshape(n, h, p, w, p, C).transpose(0, 1, 3, 2, 4, 5)  # n h w p q c
    x = np.ascontiguousarray(x).reshape(n, h * w, p * p * C)
    return x if batched else x[0]


def unpatchify_hwc(x: np.ndarray, p: int) -> np.ndarray:
    """(N, L, p*p*C) -> (N, H, W, C), square grid."""
    n, L, D = x.shape
    C = D // (p * p)
    h = w = int(round(L**0.5))
    return x.reshape(n, h, w, p, p, C).transpose(0, 1, 3, 2, 4, 5).reshape(n, h * p, w * p, C)


# ---------------------------------------------------------------------------- fine-tuning (official code)
# facebookresearch/mae util/lr_decay.py, verbatim but for the unused name dict.
def official_param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=[], layer_decay=.75):  # noqa: B006
    param_groups = {}
    num_layers = len(model.blocks) + 1
    layer_scales = list(layer_decay ** (num_layers - i) for i in range(num_layers + 1))
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or n in no_weight_decay_list:
            g_decay = "no_decay"
            this_decay = 0.
        else:
            g_decay = "decay"
            this_decay = weight_decay
        layer_id = official_get_layer_id_for_vit(n, num_layers)
        group_name = "layer_%d_%s" % (layer_id, g_decay)
        if group_name not in param_groups:
            this_scale = layer_scales[layer_id]
            param_groups[group_name] = {"lr_scale": this_scale, "weight_decay": this_decay, "params": []}
        param_groups[group_name]["params"].append(p)
    return list(param_groups.values())


def official_get_layer_id_for_vit(name, num_layers):
    if name in ['cls_token', 'pos_embed']:
        return 0
    elif name.startswith('patch_embed'):
        return 0
    elif name.startswith('blocks'):
        return int(name.split('.')[1]) + 1
    else:
        return num_layers


# util/lr_sched.py: the lr of a (fractional) epoch, applied per param group with its lr_scale.
def official_adjust_learning_rate(param_groups, epoch, lr, min_lr, warmup_epochs, epochs):
    import math
    if epoch < warmup_epochs:
        lr = lr * epoch / warmup_epochs
    else:
        lr = min_lr + (lr - min_lr) * 0.5 * (1. + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))
    for param_group in param_groups:
        if "lr_scale" in param_group:
            param_group["lr"] = lr * param_group["lr_scale"]
        else:
            param_group["lr"] = lr
    return lr


# util/pos_embed.py interpolate_pos_embed, on (num_patches, pos_embed shape) instead of a model.
def official_interpolate_pos_embed(num_patches, model_pos_embed_shape, checkpoint_model):
    if 'pos_embed' in checkpoint_model:
        pos_embed_checkpoint = checkpoint_model['pos_embed']
        embedding_size = pos_embed_checkpoint.shape[-1]
        num_extra_tokens = model_pos_embed_shape[-2] - num_patches
        orig_size = int((pos_embed_checkpoint.shape[-2] - num_extra_tokens) ** 0.5)
        new_size = int(num_patches ** 0.5)
        if orig_size != new_size:
            extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
            pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
            pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
            pos_tokens = torch.nn.functional.interpolate(
                pos_tokens, size=(new_size, new_size), mode='bicubic', align_corners=False)
            pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
            new_pos_embed = torch.cat((extra_tokens, pos_tokens), dim=1)
            checkpoint_model['pos_embed'] = new_pos_embed
