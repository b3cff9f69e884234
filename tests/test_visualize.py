"""The reconstruction figure (jobs.core.visualize): a grid with white gutters, column headings, cells
enlarged to a readable size; the micro model's figure written as a PNG. No Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.core.visualize import (COLUMNS, figure, layout, reconstruction_cells, reconstruction_grid,
                                 save_png)
from pipeline.patchify import patchify


def _cells(n: int, s: int, seed: int = 0) -> np.ndarray:
    """Random cells (n, 4, s, s, 3) with no pure-white pixel, so that white = gutter."""
    return np.random.default_rng(seed).integers(0, 250, size=(n, 4, s, s, 3), dtype=np.uint8)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of every run of True in a 1-D bool array."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(int(a), int(b - a)) for a, b in zip(starts, ends)]


def _white(a: np.ndarray) -> np.ndarray:
    return (a == 255).all(axis=-1)


def _grid(fig: np.ndarray, n: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Found from the pixels alone: the y runs of the n rows of cells (the last n runs of rows that
    are not all white; above them only the headings) and the x runs of the cell columns."""
    row_runs = _runs(~_white(fig).all(axis=1))
    assert len(row_runs) > n, f"expected a heading band above {n} rows of cells, found runs {row_runs}"
    rows = row_runs[-n:]
    body = fig[rows[0][0]:]
    col_runs = _runs(~_white(body).all(axis=0))
    return rows, col_runs


@pytest.mark.parametrize("s, cell", [(32, 160), (36, 180), (224, 224)])
def test_figure_white_gutter_between_every_cell(s, cell):
    n = 3 if s < 224 else 2
    fig = figure(_cells(n, s))
    assert fig.dtype == np.uint8 and fig.ndim == 3 and fig.shape[2] == 3
    rows, cols = _grid(fig, n)
    assert [h for _, h in rows] == [cell] * n, rows
    assert [w for _, w in cols] == [cell] * 4, cols
    # Between two neighbours (and around the grid) a gutter of pure white, the same everywhere.
    gaps_x = [cols[0][0]] + [b[0] - (a[0] + a[1]) for a, b in zip(cols, cols[1:])] + \
        [fig.shape[1] - (cols[-1][0] + cols[-1][1])]
    gaps_y = [b[0] - (a[0] + a[1]) for a, b in zip(rows, rows[1:])] + [fig.shape[0] - (rows[-1][0] + rows[-1][1])]
    assert len(set(gaps_x)) == 1 and gaps_x[0] >= 4, gaps_x
    assert set(gaps_y) == {gaps_x[0]}, (gaps_y, gaps_x)
    # The gutters really are white over the whole grid, as the layout says.
    lay = layout((n, 4, s, s, 3))
    assert (lay.cell_h, lay.cell_w, lay.gutter) == (cell, cell, gaps_x[0])
    assert fig.shape[:2] == (lay.height, lay.width)
    for j in range(1, 4):
        x = lay.origin(0, j)[1]
        assert _white(fig[lay.top:, x - lay.gutter:x]).all()
    for i in range(1, n):
        y = lay.origin(i, 0)[0]
        assert _white(fig[y - lay.gutter:y]).all()


@pytest.mark.parametrize("s", [32, 224])
def test_figure_cells_are_the_enlarged_images(s):
    n = 2
    cells = _cells(n, s, seed=1)
    fig = figure(cells)
    lay = layout(cells.shape)
    k = lay.scale
    assert k == (5 if s == 32 else 1)
    for i in range(n):
        for j in range(4):
            y, x = lay.origin(i, j)
            want = np.repeat(np.repeat(cells[i, j], k, axis=0), k, axis=1)  # nearest-neighbour xk
            assert np.array_equal(fig[y:y + lay.cell_h, x:x + lay.cell_w], want), (i, j)
    # Nearest neighbour through PIL gives the same pixels.
    pil = np.asarray(Image.fromarray(cells[0, 0]).resize((s * k, s * k), Image.NEAREST))
    y, x = lay.origin(0, 0)
    assert np.array_equal(fig[y:y + s * k, x:x + s * k], pil)


def test_figure_headings_above_each_column():
    n = 2
    fig = figure(_cells(n, 32, seed=2))
    rows, cols = _grid(fig, n)
    band = fig[:rows[0][0]]
    assert band.shape[0] >= 10
    dark = (band.astype(int).sum(axis=-1) < 3 * 100)  # text pixels
    assert dark.any(axis=1).sum() >= 6, "no text of any height in the heading band"
    for j, (x, w) in enumerate(cols):
        assert dark[:, x:x + w].any(), f"no heading text above column {j} ({COLUMNS[j]!r})"
    # Headings are centred on their columns and all differ (not one label smeared over the band).
    inked = dark.any(axis=0)  # (W,) columns with text
    centres = [x + np.flatnonzero(inked[x:x + w]).mean() for x, w in cols]
    for (x, w), c in zip(cols, centres):
        assert abs(c - (x + w / 2)) < w / 8, (x, w, c)
    # Without headings: no band, the grid starts one gutter below the top.
    bare = figure(_cells(n, 32, seed=2), headings=None)
    lay = layout((n, 4, 32, 32, 3), headings=None)
    assert lay.top == lay.gutter and _white(bare[:lay.gutter]).all()
    assert bare.shape[0] < fig.shape[0] and bare.shape[1] == fig.shape[1]


def test_figure_rejects_bad_input():
    with pytest.raises(ValueError):
        figure(np.zeros((2, 4, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        figure(np.zeros((2, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError):
        figure(np.zeros((2, 3, 32, 32, 3), dtype=np.uint8))  # 3 columns, 4 headings
    assert figure(np.zeros((2, 3, 32, 32, 3), dtype=np.uint8), headings=("a", "b", "c")).shape[1] == \
        layout((2, 3, 32, 32, 3), headings=("a", "b", "c")).width


def test_micro_model_figure_written_as_png(tmp_path):
    from mae_model import MaskedAutoencoder, mae_vit_micro_patch4
    torch.manual_seed(0)
    model = MaskedAutoencoder(mae_vit_micro_patch4()).eval()
    n, s, p = 2, model.config.img_size, model.config.patch_size
    imgs = torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8)
    patches = patchify(imgs, p)
    noise = torch.rand(n, (s // p) ** 2)
    cells = reconstruction_cells(model, patches, noise)
    assert cells.shape == (n, 4, s, s, 3) and cells.dtype == np.uint8
    assert np.array_equal(cells[:, 0], imgs.permute(0, 2, 3, 1).numpy())  # the original, exactly
    fig = figure(cells)
    assert np.array_equal(reconstruction_grid(model, patches, noise), fig)  # the trainer's one call
    lay = layout(cells.shape)
    assert lay.cell_h >= 160 and fig.shape[:2] == (lay.height, lay.width)
    path = tmp_path / "reconstruction.png"
    save_png(fig, str(path))
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (fig.shape[1], fig.shape[0])
        assert np.array_equal(np.asarray(im), fig)
