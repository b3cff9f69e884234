"""What to crop, without touching pixels: the transform's settings and the per-row draws.

Torch-free on purpose: Ray Data's coordinator and stats actors unpickle the dataset plan (which
holds a :class:`TransformConfig`), and in ``data.decode: gpu`` mode the decode tasks only draw
crop plans; neither should pay the ~3 CPU-s of importing torch in every process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .decode import DEFAULT_MAX_PIXELS, displayed_size, exif_orientation, open_image


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
    auto_augment: str = ""  # train: a timm policy applied after crop and flip, e.g. rand-m9-mstd0.5-inc1


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


class CropPlan(NamedTuple):
    box: tuple[float, float, float, float]  # (l, t, r, b) in displayed (post-EXIF) pixels
    flip: bool
    orient: int  # EXIF orientation 1-8: how the stored pixels turn into the displayed ones


def crop_plan(data: bytes, cfg: TransformConfig, rng: np.random.Generator) -> CropPlan:
    """Header only -> (box (l, t, r, b) in displayed pixels, flip, EXIF orientation), the box and
    flip drawn exactly as :func:`pipeline.transforms.transform_image` draws them. A decoder that
    returns the stored pixels (nvJPEG) must apply ``orient`` before cropping. Raises SkipImage."""
    header = open_image(data, cfg.max_pixels)
    W, H = displayed_size(header)
    orient = exif_orientation(header)
    if cfg.train:
        l, t, w, h = random_resized_crop_params(W, H, rng, cfg.scale, cfg.ratio)
        box = (l, t, l + w, t + h)
        return CropPlan(box, bool(rng.random() < cfg.hflip), orient)
    return CropPlan(center_crop_box(W, H, cfg.img_size, cfg.crop_pct), False, orient)
