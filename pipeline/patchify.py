"""The one definition of the patch layout (DESIGN.md "Batch" contract), used by every path: the
CPU decode tasks (:mod:`pipeline.transforms`), the device decode (:mod:`pipeline.gpu_decode`) and
the reconstruction pictures (:mod:`jobs.core.visualize`).

Patches are in row-major grid order; each patch is flattened in ``(p, q, c)`` order, exactly as
the official ``patchify``: ``x.reshape(N,3,h,p,w,p)`` -> ``einsum('nchpwq->nhwpqc')`` ->
``reshape(N, h*w, p*p*3)``. It is a reshape + permute with no dtype change: uint8 stays uint8.
"""

from __future__ import annotations

import torch


def _grid(H: int, W: int, p: int) -> tuple[int, int]:
    if H % p or W % p:
        raise ValueError(f"image of {H}x{W} is not divisible into {p}x{p} patches")
    return H // p, W // p


def patchify(imgs: torch.Tensor, patch_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """imgs: (N, C, H, W) or (C, H, W), any dtype and device -> contiguous (N, L, p*p*C) or
    (L, p*p*C) of the same dtype, L = (H/p)*(W/p).

    In one strided copy, into ``out`` when given (a contiguous tensor of the result's shape and
    dtype, e.g. ``torch.from_numpy`` of a row of a preallocated batch): no intermediate image."""
    batched = imgs.ndim == 4
    x = imgs if batched else imgs[None]
    n, C, H, W = x.shape
    p = patch_size
    h, w = _grid(H, W, p)
    src = x.reshape(n, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # n c h p w q -> n h w p q c
    shape = (n, h * w, p * p * C) if batched else (h * w, p * p * C)
    if out is None:
        return src.reshape(shape).contiguous()
    if tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {shape} tensor, got {tuple(out.shape)}")
    out.view(n, h, w, p, p, C).copy_(src)
    return out


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """The inverse of :func:`patchify`: x (N, L, p*p*C) or (L, p*p*C) -> (N, C, H, W) or (C, H, W),
    same dtype, H = h*p, W = w*p for the grid (h, w) (default: square, h = w = sqrt(L))."""
    batched = x.ndim == 3
    y = x if batched else x[None]
    n, L, D = y.shape
    p = patch_size
    C = D // (p * p)
    h, w = grid if grid else (int(round(L**0.5)),) * 2
    if h * w != L or C * p * p != D:
        raise ValueError(f"{L} patches of {D} values do not form a {h}x{w} grid of {p}x{p} patches")
    imgs = y.reshape(n, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)  # n h w p q c -> n c h p w q
    imgs = imgs.reshape(n, C, h * p, w * p)
    return imgs if batched else imgs[0]
