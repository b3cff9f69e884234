"""Fixed 2-D sin-cos position embeddings, exactly as the official MAE ``util/pos_embed.py``.

The official code builds the grid with ``np.meshgrid(grid_w, grid_h)``, so the first half of
the width encodes the *column* (w) coordinate and the second half the *row* (h) coordinate.
We keep that order so that official checkpoints and ours carry identical tables.
"""

from __future__ import annotations

import torch


def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos: (M,) -> (M, embed_dim) as ``[sin(pos * omega), cos(pos * omega)]``."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """-> (grid_size**2 [+1], embed_dim) float32; the cls position (first row) is all zeros."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    # grid[0][i, j] = j (w), grid[1][i, j] = i (h): np.meshgrid's default 'xy' indexing.
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")
    emb_a = get_1d_sincos_pos_embed(embed_dim // 2, grid_w)
    emb_b = get_1d_sincos_pos_embed(embed_dim // 2, grid_h)
    emb = torch.cat([emb_a, emb_b], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
