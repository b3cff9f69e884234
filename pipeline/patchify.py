"""The one definition of the patch layout (DESIGN.md "Batch" contract).

Patches are in row-major grid order; each patch is flattened in ``(p, q, c)`` order, exactly as
the official ``patchify``: ``x.reshape(N,3,h,p,w,p)`` -> ``einsum('nchpwq->nhwpqc')`` ->
``reshape(N, h*w, p*p*3)``. Starting from HWC images (what PIL gives), that is a pure reshape +
transpose, with no dtype change: uint8 stays uint8.
"""

from __future__ import annotations

import numpy as np
import torch


def patchify(img: np.ndarray, patch_size: int) -> np.ndarray:
    """img: (H, W, C) or (N, H, W, C) -> (L, p*p*C) or (N, L, p*p*C), L = (H/p)*(W/p)."""
    batched = img.ndim == 4
    x = img if batched else img[None]
    n, H, W, C = x.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image of {H}x{W} is not divisible into {p}x{p} patches")
    h, w = H // p, W // p
    x = x.reshape(n, h, p, w, p, C).transpose(0, 1, 3, 2, 4, 5)  # n h w p q c
    x = np.ascontiguousarray(x).reshape(n, h * w, p * p * C)
    return x if batched else x[0]


def patchify_chw(img: torch.Tensor, patch_size: int, out: np.ndarray | None = None) -> np.ndarray:
    """img: tensor (C, H, W) -> array (L, p*p*C) in the same layout as :func:`patchify`, in one
    strided copy (into ``out``, a contiguous (L, p*p*C) array, when given): about 2.5x faster
    than going through a contiguous HWC image first."""
    C, H, W = img.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image of {H}x{W} is not divisible into {p}x{p} patches")
    h, w = H // p, W // p
    if out is None:
        out = torch.empty((h * w, p * p * C), dtype=img.dtype).numpy()
    elif out.shape != (h * w, p * p * C) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous ({h * w}, {p * p * C}) array, got {out.shape}")
    dst = torch.from_numpy(out).view(h, w, p, p, C)
    dst.copy_(img.reshape(C, h, p, w, p).permute(1, 3, 2, 4, 0))  # c h p w q -> h w p q c
    return out


def unpatchify(x, patch_size: int, grid: tuple[int, int] | None = None):
    """(N, L, p*p*C) -> (N, H, W, C); works on numpy arrays and torch tensors."""
    n, L, D = x.shape
    p = patch_size
    C = D // (p * p)
    h, w = grid if grid else (int(round(L**0.5)),) * 2
    if h * w != L:
        raise ValueError(f"{L} patches do not form a {h}x{w} grid")
    x = x.reshape(n, h, w, p, p, C)
    if isinstance(x, torch.Tensor):
        return x.permute(0, 1, 3, 2, 4, 5).reshape(n, h * p, w * p, C)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h * p, w * p, C)


def patchify_official(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """The official MAE ``patchify``, verbatim in meaning: imgs (N, 3, H, W) -> (N, L, p*p*3)."""
    h = w = imgs.shape[2] // p
    x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(imgs.shape[0], h * w, p**2 * 3)
