"""Synthetic images, no download needed: a learnable labeled set (tests, demo, tuning) and
every odd kind of file a real bucket holds (tests of the decoder's robustness)."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image

CLASSES = ("stripes_h", "stripes_v", "checker", "rings")


def pattern(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) uint8 image whose structure depends on ``label``: predictable from
    visible patches (so MAE can learn it) and separable by class (so probes can score it)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    freq = rng.uniform(2.5, 5.0)
    phase = rng.uniform(0, 2 * np.pi)
    if label == 0:
        v = np.sin(2 * np.pi * freq * yy + phase)
    elif label == 1:
        v = np.sin(2 * np.pi * freq * xx + phase)
    elif label == 2:
        v = np.sign(np.sin(2 * np.pi * freq * xx + phase)) * np.sign(np.sin(2 * np.pi * freq * yy + phase))
    else:
        cy, cx = rng.uniform(0.3, 0.7, size=2)
        v = np.sin(2 * np.pi * freq * np.hypot(yy - cy, xx - cx) * 1.5 + phase)
    return np.clip(_two_tones(v, size, rng), 0, 255).astype(np.uint8)


def _two_tones(v: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """v (size, size) in [-1, 1] -> (size, size, 3) float pixels between a light and a dark tone.

    Light and dark tones with a small random tint and pixel noise: colour carries (almost) no
    class information, so a probe must read the structure, which is what MAE learns to model."""
    c1 = rng.uniform(170, 230) + rng.normal(0, 12, size=3)
    c2 = rng.uniform(30, 90) + rng.normal(0, 12, size=3)
    t = (v[..., None] + 1) / 2
    return c1 * t + c2 * (1 - t) + rng.normal(0, 8, size=(size, size, 3))


LAYOUT_CLASSES = ("h_over_v", "v_over_h", "h_left_of_v", "v_left_of_h")


def _stripes(horizontal: bool, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    v = np.sin(2 * np.pi * rng.uniform(2.5, 5.0) * (yy if horizontal else xx) + rng.uniform(0, 2 * np.pi))
    return _two_tones(v, size, rng)


def layout_pattern(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) uint8 image made of two halves, one of horizontal and one of vertical
    stripes; the class is the *arrangement* (which half is above / left of the other).

    Every class has the same bag of local patches (half of each orientation), so features that
    pool local patch statistics (a randomly initialized ViT is close to that) cannot tell the
    classes apart; telling them apart needs the global layout, which MAE must model to fill in
    masked patches from the visible ones. This is the set on which pretraining shows as a gain
    over random initialization."""
    first, second = _stripes(True, size, rng), _stripes(False, size, rng)
    if label % 2:
        first, second = second, first
    out = np.empty((size, size, 3), np.float32)
    h = size // 2
    if label % 4 < 2:
        out[:h], out[h:] = first[:h], second[h:]
    else:
        out[:, :h], out[:, h:] = first[:, :h], second[:, h:]
    return np.clip(out, 0, 255).astype(np.uint8)


def encode(arr_or_img, fmt: str = "JPEG", **kw) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_labeled_folder(root: str, n_per_class: int, size: int = 48, seed: int = 0,
                         classes=None, kind: str = "structure") -> list[str]:
    """ImageFolder layout ``root/<class>/<i>.jpg``. Returns the written paths.

    ``kind="structure"``: one texture per class (:func:`pattern`); ``kind="layout"``: classes that
    differ only in the arrangement of two textures (:func:`layout_pattern`)."""
    make = {"structure": pattern, "layout": layout_pattern}.get(kind)
    if make is None:
        raise ValueError(f"kind={kind!r}: choose 'structure' or 'layout'")
    classes = classes or (CLASSES if kind == "structure" else LAYOUT_CLASSES)
    rng = np.random.default_rng(seed)
    paths = []
    for label, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(n_per_class):
            p = os.path.join(root, name, f"{i:05d}.jpg")
            with open(p, "wb") as f:
                f.write(encode(make(label % 4, size, rng), "JPEG", quality=92))
            paths.append(p)
    return paths


def _png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's calling card)."""
    small = encode(Image.new("L", (8, 8)), "PNG")
    ihdr_at = small.index(b"IHDR")
    data = bytearray(small)
    data[ihdr_at + 4:ihdr_at + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr_at:ihdr_at + 17])) & 0xFFFFFFFF
    data[ihdr_at + 17:ihdr_at + 21] = struct.pack(">I", crc)
    return bytes(data)


def odd_images(size: int = 40, seed: int = 0) -> dict[str, tuple[bytes, bool]]:
    """name -> (bytes, decodable). Every PIL mode the decoder must turn into RGB, plus files
    it must skip with a reason."""
    rng = np.random.default_rng(seed)
    rgb = pattern(1, size, rng)
    g = rgb.mean(-1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    rot = Image.fromarray(pattern(0, size, rng)[:, : size // 2])  # w != h, to see the swap
    p_trans = Image.fromarray(rgb).convert("P")
    p_trans.info["transparency"] = 0
    good = {
        "rgb.jpg": encode(rgb, "JPEG", quality=90),
        "gray_L.png": encode(Image.fromarray(g, "L"), "PNG"),
        "gray_LA.png": encode(Image.fromarray(np.stack([g, g], -1), "LA"), "PNG"),
        "palette_P.png": encode(Image.fromarray(rgb).convert("P"), "PNG"),
        "palette_transparent.png": encode(p_trans, "PNG"),
        "rgba.png": encode(Image.fromarray(np.concatenate([rgb, g[..., None]], -1), "RGBA"), "PNG"),
        "cmyk.jpg": encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "sixteen_bit.png": encode(Image.fromarray(g.astype(np.uint16) * 257), "PNG"),
        "bilevel_1.png": encode(Image.fromarray(g > 128), "PNG"),
        "exif_rotated.jpg": encode(rot, "JPEG", exif=exif.tobytes()),
        "webp.webp": encode(rgb, "WEBP"),
        "tiny_2x3.png": encode(rgb[:3, :2], "PNG"),
    }
    jpg = good["rgb.jpg"]
    bad = {
        "empty.jpg": b"",
        "text.jpg": b"this is not an image, just text in a .jpg file\n" * 4,
        "truncated.jpg": jpg[: len(jpg) // 2],
        "corrupt_header.png": b"\x89PNG\r\n\x1a\n" + os.urandom(64),
        "bomb.png": _png_with_header_size(200_000, 200_000),
    }
    return {**{k: (v, True) for k, v in good.items()}, **{k: (v, False) for k, v in bad.items()}}


def write_odd_folder(root: str, **kw) -> dict[str, bool]:
    os.makedirs(root, exist_ok=True)
    out = {}
    for name, (data, ok) in odd_images(**kw).items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        out[name] = ok
    return out


def write_digits_folder(root: str, upsample: int = 4, border: int = 2) -> list[str]:
    """scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes, shipped inside its
    wheel: no download) as an ImageFolder ``root/<digit>/<i>.png``: 0..16 -> 0..255, upsampled
    ``upsample`` x (nearest: each scan pixel stays a sharp block) with a black ``border``, so that
    the eval center crop (87.5%) cuts only border. 36 x 36 px by default, for 32-px models."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits set needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    paths = []
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        a = np.round(img * (255 / 16)).astype(np.uint8)
        a = np.kron(a, np.ones((upsample, upsample), np.uint8))
        a = np.pad(a, border)
        folder = os.path.join(root, str(int(label)))
        os.makedirs(folder, exist_ok=True)
        p = os.path.join(folder, f"{i:05d}.png")
        with open(p, "wb") as f:
            f.write(encode(np.stack([a] * 3, axis=-1), "PNG"))
        paths.append(p)
    return paths
