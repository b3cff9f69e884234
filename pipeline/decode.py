"""Image bytes -> RGB pixels, robustly and cheaply.

- EXIF orientation applied; every PIL mode (L, LA, P, RGBA, CMYK, I;16, 1, ...) -> RGB, alpha
  composited on white.
- A pixel-count guard against decompression bombs, checked from the header before decoding.
- Reduced-size decoding (JPEG DCT scaling through PIL ``draft``) when the region we need is much
  larger than the output: decoding is the pipeline's main cost, and a DCT-domain 1/2, 1/4 or 1/8
  decode is both faster and close to a full decode followed by a resize.
- Anything that is not a decodable image raises :class:`SkipImage` with a short reason, so that the
  pipeline skips and counts it instead of crashing an epoch.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 128 * 1024 * 1024  # ~11k x 11k; far beyond any photo a crop needs

# Keep PIL from raising its own DecompressionBombError first with a different message: our
# guard (checked from the header) is the one that decides and counts.
Image.MAX_IMAGE_PIXELS = None


class SkipImage(Exception):
    """The object is not a usable image; ``reason`` is a short category for the skip counters."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (header only) and check size. Raises SkipImage."""
    if not data:
        raise SkipImage("empty")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - any unreadable header is a skip
        raise SkipImage("not_an_image", type(e).__name__) from None
    w, h = img.size
    if w < 1 or h < 1:
        raise SkipImage("empty")
    if w * h > max_pixels:
        raise SkipImage("too_many_pixels", f"{w}x{h} > {max_pixels}")
    return img


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) that ``ImageOps.exif_transpose`` applies, from the header alone;
    1 (as stored) when the tag is absent, unreadable or out of range."""
    try:
        o = img.getexif().get(0x0112, 1)
        return int(o) if o in (1, 2, 3, 4, 5, 6, 7, 8) else 1  # what exif_transpose's table matches
    except Exception:  # noqa: BLE001
        return 1


def _exif_transposes(img: Image.Image) -> bool:
    return exif_orientation(img) >= 5  # orientations 5-8 swap w and h


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (alpha over white; 16-bit scaled to 8-bit)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = ((a - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img.convert("RGB")


def decode(data: bytes, *, need: tuple[int, int] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
           img: Image.Image | None = None) -> Image.Image:
    """Decode to an RGB image (EXIF orientation applied).

    need: (w, h) in *displayed* (post-EXIF) pixels below which the decoded image must not
    shrink; with it, JPEGs are decoded at the largest DCT reduction (1/2, 1/4, 1/8) that keeps
    at least that size. Raises SkipImage.
    """
    img = img or open_image(data, max_pixels)
    try:
        if need is not None and img.format == "JPEG":
            nw, nh = need
            if _exif_transposes(img):
                nw, nh = nh, nw
            img.draft("RGB", (max(1, int(nw)), max(1, int(nh))))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except SkipImage:
        raise
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, unsupported: all skips
        text = str(e).lower()
        reason = "truncated" if ("truncated" in text or "premature" in text or "broken data" in text) \
            else "corrupt"
        raise SkipImage(reason, f"{type(e).__name__}: {str(e)[:80]}") from None


def displayed_size(img: Image.Image) -> tuple[int, int]:
    """(w, h) after EXIF orientation, from the header alone."""
    w, h = img.size
    return (h, w) if _exif_transposes(img) else (w, h)
