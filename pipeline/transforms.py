"""Augmentation and patchify: encoded bytes -> uint8 patches ``[L, p*p*3]``.

Train: RandomResizedCrop(img_size, scale (0.2, 1.0), ratio (3/4, 4/3), bicubic) + horizontal
flip, the MAE recipe. Eval: resize the short side to ``img_size / 0.875`` and center-crop.
The crop box is drawn from the header size *before* decoding, so the decoder can use JPEG DCT
scaling for the region it needs; only the crop is copied out, and resized by torch's uint8
antialiased bicubic kernel (PIL's filter, ~3x faster than PIL here; torchvision's resize calls it).
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .crops import TransformConfig, center_crop_box, random_resized_crop_params  # noqa: F401 (re-exported)
from .decode import SkipImage, decode, displayed_size, open_image
from .patchify import patchify

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the fill of timm's geometric ops (mae_model's normalization)

# The crop is read, never written: torch's warning about the read-only numpy view is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


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


@functools.lru_cache(maxsize=4)
def auto_augment_transform(policy: str, img_size: int):
    """timm's augmentation policy built exactly as timm's ``create_transform(is_training=True,
    auto_augment=policy, interpolation="bicubic")`` builds it (the official fine-tuning recipe):
    translations of 0.45 x the image side, the ImageNet mean as fill, bicubic."""
    from .private_api import import_timm
    timm_aa = import_timm("timm.data.auto_augment")
    augment_and_mix_transform, aa, rand_augment_transform = (
        timm_aa.augment_and_mix_transform, timm_aa.auto_augment_transform, timm_aa.rand_augment_transform)
    str_to_pil_interp = import_timm("timm.data.transforms").str_to_pil_interp
    params = dict(translate_const=int(img_size * 0.45), img_mean=tuple(min(255, round(255 * x)) for x in IMAGENET_MEAN),
                  interpolation=str_to_pil_interp("bicubic"))
    if policy.startswith("rand"):
        return rand_augment_transform(policy, params)
    if policy.startswith("augmix"):
        return augment_and_mix_transform(policy, dict(params, translate_pct=0.3))
    return aa(policy, params)


def apply_auto_augment(a: torch.Tensor, policy: str, rng: np.random.Generator) -> torch.Tensor:
    """uint8 (3, S, S) -> the policy applied (a PIL round trip), seeded from the row's generator:
    timm draws from Python's and numpy's global generators, seeded here per image, so a resumed run
    sees the same augmentations."""
    import random
    random.seed(int(rng.integers(2**63)))
    np.random.seed(int(rng.integers(2**32)))
    img = Image.fromarray(a.permute(1, 2, 0).contiguous().numpy())
    out = np.asarray(auto_augment_transform(policy, a.shape[-1])(img).convert("RGB"))
    return torch.from_numpy(out.copy()).permute(2, 0, 1)


def transform_image(data: bytes, cfg: TransformConfig, rng: np.random.Generator,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Encoded image -> uint8 patches (L, p*p*3), written into ``out`` when given (a contiguous
    (L, p*p*3) uint8 array, a row of the batch: the resized pixels are copied once, flip and patch
    layout included). Raises SkipImage."""
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
    if cfg.auto_augment:
        a = apply_auto_augment(a, cfg.auto_augment, rng)
    if tuple(a.shape) != (3, S, S):
        raise SkipImage("corrupt", f"unexpected decoded shape {a.shape}")
    if out is None:
        return patchify(a, cfg.patch_size).numpy()
    patchify(a, cfg.patch_size, out=torch.from_numpy(out))  # into the caller's array, no copy of it
    return out
