"""The MAE paper's figure (Figure 2): original | masked | reconstruction | reconstruction + visible.

Three steps, each usable alone:

* :func:`reconstruction_cells` runs the model: uint8 cells ``(N, 4, S, S, 3)``, one row per image,
  one column per heading of :data:`COLUMNS`;
* :func:`figure` lays the cells out (pure numpy + PIL text, no model): a white grid with a gutter
  around and between every cell, a band of column headings on top, each cell enlarged by an
  integer factor (nearest neighbour) so that small images (32 px, 36 px) are at least
  ``min_cell`` (160) px while a 224 px image stays at its native 224 px;
* :func:`save_png` writes the figure as it is.

:func:`reconstruction_grid` is the first two in one: it returns the figure ``(H, W, 3)`` uint8,
which is also what an image summary (TensorBoard ``add_image(..., dataformats="HWC")``, MLflow
``log_image``) takes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline.patchify import unpatchify

COLUMNS: tuple[str, ...] = ("original", "masked", "reconstruction", "reconstruction + visible")
"""The column headings of the figure, in the order of the cells' axis 1."""

MIN_CELL = 160
"""Cells smaller than this (px, longer side) are enlarged by the smallest integer factor reaching it."""

WHITE = 255
INK = (0, 0, 0)


@torch.no_grad()
def reconstruction_cells(model, patches: torch.Tensor, noise: torch.Tensor) -> np.ndarray:
    """patches: uint8 (N, L, p*p*3), noise: (N, L) -> uint8 cells (N, 4, S, S, 3), S = sqrt(L)*p.

    Axis 1 follows :data:`COLUMNS`: the original, the masked input (masked patches mid-gray), the
    reconstruction (every patch predicted) and the reconstruction with the visible patches pasted
    back. Every rank must call this under FSDP (the forward is collective). Predictions of a
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
    cols = [unpatchify(x.float().cpu(), cfg.patch_size).permute(0, 2, 3, 1)  # (N, 3, S, S) -> (N, S, S, 3)
            for x in (orig, masked, rec, pasted)]
    cells = torch.stack(cols, dim=1)  # (N, 4, S, S, 3)
    return (cells.numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)


@torch.no_grad()
def reconstruction_grid(model, patches: torch.Tensor, noise: torch.Tensor) -> np.ndarray:
    """patches: uint8 (N, L, p*p*3), noise: (N, L) -> the figure, uint8 (H, W, 3).

    ``figure(reconstruction_cells(model, patches, noise))``; see :func:`figure` for the layout.
    Every rank must call this under FSDP (the forward is collective)."""
    return figure(reconstruction_cells(model, patches, noise))


@dataclass(frozen=True)
class Layout:
    """Where :func:`figure` puts things, all in px of the figure.

    ``scale``: the integer enlargement of a cell; ``cell_h, cell_w``: an enlarged cell;
    ``gutter``: the white space around and between the cells; ``top``: the y of the first row of
    cells (the heading band is ``[0, top - gutter)``, or nothing when ``top == gutter``);
    ``height, width``: the figure's."""

    rows: int
    cols: int
    scale: int
    cell_h: int
    cell_w: int
    gutter: int
    top: int

    @property
    def height(self) -> int:
        return self.top + self.rows * (self.cell_h + self.gutter)

    @property
    def width(self) -> int:
        return self.gutter + self.cols * (self.cell_w + self.gutter)

    def origin(self, i: int, j: int) -> tuple[int, int]:
        """(y, x) of the top-left pixel of the cell of row ``i``, column ``j``."""
        return self.top + i * (self.cell_h + self.gutter), self.gutter + j * (self.cell_w + self.gutter)


def _font(cell_w: int, headings: Sequence[str]):
    """The default font (PIL's own, no file) at a size that scales with the cell and fits every
    heading inside one cell's width (down to 8 px); Pillow without FreeType gets its fixed bitmap."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    size = max(12, cell_w // 11)
    while True:
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: no size, a fixed bitmap font
            return ImageFont.load_default()
        widest = max(draw.textlength(h, font=font) for h in headings)
        if widest <= cell_w - 4 or size <= 8 or not isinstance(font, ImageFont.FreeTypeFont):
            return font
        size -= 1


def figure(cells: np.ndarray, headings: Sequence[str] | None = COLUMNS,
           min_cell: int = MIN_CELL) -> np.ndarray:
    """cells: uint8 (N, C, h, w, 3) -> the figure, uint8 (H, W, 3) on white.

    Row ``i``, column ``j`` of the grid is ``cells[i, j]`` enlarged by the integer ``scale`` =
    ``max(1, ceil(min_cell / max(h, w)))`` with nearest neighbour (pixel repetition: a 32 px cell
    becomes 160 px, a 36 px one 180 px, a 224 px one stays 224 px). Every cell has a pure-white
    gutter of ``max(4, cell_w // 16)`` px on each side (shared between neighbours), and above the
    first row a band with ``headings[j]`` (black, PIL's default font) centred over column ``j``;
    ``headings=None`` or ``()`` leaves the band out. See :func:`layout` for the exact positions.
    """
    cells = np.asarray(cells)
    if cells.ndim != 5 or cells.shape[-1] != 3 or cells.dtype != np.uint8:
        raise ValueError(f"cells must be uint8 (N, C, h, w, 3), got {cells.dtype} {cells.shape}")
    headings = tuple(headings or ())
    if headings and len(headings) != cells.shape[1]:
        raise ValueError(f"{len(headings)} headings for {cells.shape[1]} columns")
    lay, font = _layout(cells.shape, headings, min_cell)
    out = np.full((lay.height, lay.width, 3), WHITE, dtype=np.uint8)
    k = lay.scale
    big = cells.repeat(k, axis=2).repeat(k, axis=3) if k > 1 else cells  # (N, C, k*h, k*w, 3)
    for i in range(lay.rows):
        for j in range(lay.cols):
            y, x = lay.origin(i, j)
            out[y:y + lay.cell_h, x:x + lay.cell_w] = big[i, j]
    if headings:
        im = Image.fromarray(out)
        draw = ImageDraw.Draw(im)
        band_mid = (lay.top - lay.gutter) / 2
        for j, text in enumerate(headings):
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            x_mid = lay.origin(0, j)[1] + lay.cell_w / 2
            draw.text((round(x_mid - (left + right) / 2), round(band_mid - (top + bottom) / 2)), text,
                      fill=INK, font=font)
        # The text may only touch the band: the cells and the gutters below stay as laid out.
        out[:lay.top - lay.gutter] = np.asarray(im)[:lay.top - lay.gutter]
    return out


def _layout(shape: Sequence[int], headings: Sequence[str], min_cell: int):
    n, c, h, w = (int(s) for s in shape[:4])
    scale = max(1, math.ceil(min_cell / max(h, w, 1)))
    cell_h, cell_w = h * scale, w * scale
    gutter = max(4, cell_w // 16)
    font = None
    top = gutter
    if headings:
        font = _font(cell_w, headings)
        draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        boxes = [draw.textbbox((0, 0), t, font=font) for t in headings]
        text_h = max(b[3] for b in boxes) - min(b[1] for b in boxes)
        top = gutter + text_h + gutter + gutter  # margin, text, margin: the band; then the gutter
    return Layout(rows=n, cols=c, scale=scale, cell_h=cell_h, cell_w=cell_w, gutter=gutter, top=top), font


def layout(shape: Sequence[int], headings: Sequence[str] | None = COLUMNS, min_cell: int = MIN_CELL) -> Layout:
    """The :class:`Layout` that :func:`figure` uses for cells of ``shape`` (N, C, h, w, 3)."""
    return _layout(shape, tuple(headings or ()), min_cell)[0]


def save_png(img: np.ndarray, path: str) -> None:
    """img: uint8 (H, W, 3), e.g. a :func:`figure` -> a PNG file at ``path``, pixel for pixel."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(f"img must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
    Image.fromarray(np.ascontiguousarray(img)).save(path, format="PNG")
