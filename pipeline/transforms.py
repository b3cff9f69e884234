"""Augmentation and patchify: encoded bytes -> uint8 patches ``[L, p*p*3]``.

Train: RandomResizedCrop(img_size, scale (0.2, 1.0), ratio (3/4, 4/3), bicubic) + horizontal
flip, the MAE recipe. Eval: resize the short side to ``img_size / 0.875`` and center-crop.
The crop box is drawn from the header size *before* decoding, so the decoder can use JPEG DCT
scaling for the region it needs; only the crop is copied out, and resized by torch's uint8
antialiased bicubic kernel (PIL's filter, ~3x faster than PIL here; torchvision's resize calls it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .decode import DEFAULT_MAX_PIXELS, SkipImage, decode, displayed_size, open_image
from .patchify import patchify_chw

# The crop is read, never written: torch's warning about the read-only numpy view is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


@dataclass(frozen=True)
class TransformConfig:
    img_size: int = 224
    patch_size: int = 16
    train: bool = True
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, then center-crop
    # Decode at reduced size only while the crop keeps >= this many source pixels per output
    # pixel (a DCT downscale to >= the output size is close to a full decode + resize).
    reduced_decode: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS


def random_resized_crop_params(width: int, height: int, rng: np.random.Generator,
                               scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, with a numpy Generator. -> (left, top, w, h)"""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback to a central crop at the clamped ratio (as torchvision).
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, img_size: int, crop_pct: float) -> tuple[float, float, float, float]:
    """Box (l, t, r, b) in source pixels that resize-short-side + center-crop would keep."""
    short = min(width, height)
    side = short * crop_pct  # the crop covers crop_pct of the short side
    return ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)


def _box_decode(data: bytes, box_fn, out: int, cfg: TransformConfig) -> np.ndarray:
    """Decode (reduced where possible) and crop+resize the box that box_fn picks to out x out."""
    header = open_image(data, cfg.max_pixels)
    W, H = displayed_size(header)
    l, t, r, b = box_fn(W, H)
    need = None
    if cfg.reduced_decode:
        # The decoded image must keep the crop at >= out pixels per side.
        sx, sy = (r - l) / out, (b - t) / out
        s = min(sx, sy)
        if s >= 2:
            need = (math.ceil(W / s), math.ceil(H / s))
    img = decode(data, need=need, max_pixels=cfg.max_pixels, img=header)
    fx, fy = img.size[0] / W, img.size[1] / H
    return resize_crop_chw(img, (l * fx, t * fy, r * fx, b * fy), out)


def resize_crop_chw(img: Image.Image, box, out: int) -> torch.Tensor:
    """Crop ``box`` (l, t, r, b) and resize to (out, out) with antialiased bicubic -> uint8
    (3, out, out), contiguous: what the kernel writes, before any layout copy.

    torch's uint8 antialiased resize computes PIL's filter (bicubic a=-0.5, antialias) at about
    3x PIL's speed here; only the crop is copied out of the decoded image.
    """
    W, H = img.size
    l, t = max(0, int(round(box[0]))), max(0, int(round(box[1])))
    r, b = min(W, max(l + 1, int(round(box[2])))), min(H, max(t + 1, int(round(box[3]))))
    crop = np.asarray(img.crop((l, t, r, b)))  # (h, w, 3) uint8
    x = torch.from_numpy(crop).permute(2, 0, 1)[None]
    # torch's uint8 kernel directly: what torchvision's resize calls for uint8 + antialias (the
    # same pixels), without importing torchvision (~3 s in every decode and training process)
    x = F.interpolate(x, size=(out, out), mode="bicubic", antialias=True, align_corners=False)
    return x[0]


def transform_image(data: bytes, cfg: TransformConfig, rng: np.random.Generator,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Encoded image -> uint8 patches (L, p*p*3), written into ``out`` when given (a row of the
    batch: the resized pixels are copied once, flip and patch layout included). Raises SkipImage."""
    S = cfg.img_size
    if cfg.train:
        def box(W, H):
            l, t, w, h = random_resized_crop_params(W, H, rng, cfg.scale, cfg.ratio)
            return l, t, l + w, t + h
    else:
        def box(W, H):
            return center_crop_box(W, H, S, cfg.crop_pct)
    a = _box_decode(data, box, S, cfg)  # uint8 tensor (3, S, S)
    if cfg.train and rng.random() < cfg.hflip:
        a = a.flip(-1)
    if tuple(a.shape) != (3, S, S):
        raise SkipImage("corrupt", f"unexpected decoded shape {a.shape}")
    return patchify_chw(a, cfg.patch_size, out)
