"""The MAE paper's figure: original | masked | reconstruction | reconstruction + visible."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.patchify import unpatchify


@torch.no_grad()
def reconstruction_grid(model, patches: torch.Tensor, noise: torch.Tensor) -> np.ndarray:
    """patches: uint8 (N, L, p*p*3), noise: (N, L) -> uint8 image (N*S, 4*S, 3).

    Every rank must call this under FSDP (the forward is collective). Predictions of a
    norm-pix model are mapped back with each target patch's own mean/variance, as the official
    visualization does.
    """
    cfg = model.config
    loss, pred, mask = model(patches, noise=noise)
    target = model.normalize(patches)  # ImageNet-normalized patches
    pred = pred.float()
    if cfg.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    orig = model.denormalize(target)
    rec = model.denormalize(pred)
    m = mask.float()[..., None]
    gray = torch.full_like(orig, 0.5)
    masked = orig * (1 - m) + gray * m
    pasted = orig * (1 - m) + rec * m
    cols = [unpatchify(x.cpu(), cfg.patch_size).permute(0, 2, 3, 1)  # (N, 3, S, S) -> (N, S, S, 3)
            for x in (orig, masked, rec, pasted)]
    rows = torch.cat(cols, dim=2)  # (N, S, 4S, 3)
    img = rows.reshape(-1, rows.shape[2], 3)
    return (img.numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)


def save_png(img: np.ndarray, path: str, min_height: int = 256) -> None:
    scale = max(1, min_height // max(1, img.shape[0] // 4))
    im = Image.fromarray(img)
    if scale > 1:  # tiny demo images: enlarge so that patches are visible
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    im.save(path)
