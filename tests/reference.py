"""Reference patch layouts the tests compare ``pipeline.patchify`` with (never used by the project).

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
