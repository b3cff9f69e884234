"""``data.decode: gpu``: JPEG decode, crop, resize, flip and patchify on the training worker's device.

At thousands of images per second per GPU, CPU decode needs 16-28 cores per GPU
(``docs/scaling.md``). In this mode the Ray Data task does only the cheap half of the CPU path:
it reads the bytes, opens the header (size, EXIF orientation, the checks of ``open_image``) and
draws the crop box and flip with the same per-row seed as the CPU path
(:func:`pipeline.dataset._row_rng`), so both modes see the same crops. It ships the encoded bytes
(about 1/10 of the decoded crop) with the box, the flip and the EXIF orientation. The training
worker then decodes the batch with nvJPEG (``torchvision.io.decode_jpeg`` on a list, one batched
call), turns each image as its EXIF orientation says (the box is in displayed pixels), crops,
resizes (antialiased bicubic), flips and patchifies on the device into the same uint8
``[B, L, p*p*3]`` as the CPU path.

EXIF orientation is applied here, once, for every device: nvJPEG ignores it, and torchvision's CPU
decoder applies it only when asked, so the decoder is never asked (``apply_exif_orientation=False``).

Non-JPEG images (PNG, WebP, ...) are decoded on the worker's CPU by the CPU path's own decoder and
then go through the same device code; an image that fails to decode is skipped and counted.
On a CPU device the same code runs with ``decode_jpeg(device="cpu")``: the tests compare it with
the CPU pipeline.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .crops import crop_plan  # noqa: F401 (the task-side half, re-exported)
from .decode import SkipImage, decode, exif_orientation, open_image
from .patchify import patchify

JPEG_MAGIC = b"\xff\xd8"


def exif_orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) stored pixels -> the displayed (C, H, W), or (C, W, H) for orientations 5-8: the
    flips and transposes ``PIL.ImageOps.exif_transpose`` applies for EXIF ``orientation`` (1-8;
    any other value leaves the image as stored). A view where no flip is needed."""
    if orientation in (5, 6, 7, 8):
        img = img.transpose(-2, -1)  # 5: TRANSPOSE, then the flips that make 6, 7 and 8 of it
    dims = {2: (-1,), 3: (-2, -1), 4: (-2,), 6: (-1,), 7: (-2, -1), 8: (-2,)}.get(int(orientation))
    return img.flip(dims) if dims else img


def _decode_all(images: list[bytes], orients: list[int], device: torch.device) -> list[torch.Tensor | None]:
    """Encoded images [B], EXIF orientations [B] -> CHW uint8 RGB tensors on ``device`` as displayed
    (None: undecodable). JPEGs in one batched call (one call per image only when the batch holds a
    broken one), their orientation applied here; others on the CPU by the CPU path's decoder."""
    from torchvision.io import ImageReadMode, decode_jpeg
    out: list[torch.Tensor | None] = [None] * len(images)
    jpegs = [i for i, d in enumerate(images) if d[:2] == JPEG_MAGIC]
    raw = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in jpegs]
    # stored pixels on every device (nvJPEG cannot orient; the CPU decoder could): turned below
    kw = {"mode": ImageReadMode.RGB, "device": device, "apply_exif_orientation": False}
    try:
        decoded = decode_jpeg(raw, **kw) if raw else []
    except RuntimeError:  # one broken file fails the whole call: find it
        decoded = []
        for r in raw:
            try:
                decoded.append(decode_jpeg(r, **kw))
            except RuntimeError:
                decoded.append(None)
    for i, img in zip(jpegs, decoded):
        out[i] = None if img is None else exif_orient(img, orients[i])
    for i, d in enumerate(images):
        if out[i] is not None:
            continue
        # not a JPEG, or one the device decoder refuses (CMYK, ...): the CPU path's decoder
        # (modes, alpha, 16-bit, EXIF orientation), then the same device code
        try:
            arr = np.asarray(decode(bytes(d)))
            out[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(device)
        except SkipImage:
            pass
    return out


def _header_orientation(data: bytes) -> int:
    try:
        return exif_orientation(open_image(bytes(data)))
    except SkipImage:
        return 1


def decode_on_device(images: list[bytes], boxes: np.ndarray, flips: np.ndarray, orients: np.ndarray | None = None,
                     *, img_size: int, patch_size: int, device: torch.device) -> tuple[torch.Tensor, np.ndarray, int]:
    """images: encoded bytes [B]; boxes: float [B, 4] (l, t, r, b) in displayed pixels; flips: bool
    [B]; orients: int [B], EXIF orientation 1-8 (:func:`crop_plan`'s; None: read here from the
    headers) -> (uint8 patches [B', L, p*p*3] on ``device``, indices of the kept rows [B'], skipped
    count).

    Crop as :func:`pipeline.transforms.resize_crop_chw` rounds the box; resize by antialiased bicubic
    in float (torch's uint8 kernel is CPU-only), rounded back to uint8.
    """
    S, p = img_size, patch_size
    images = list(images)
    orients = [_header_orientation(d) for d in images] if orients is None else [int(o) for o in orients]
    decoded = _decode_all(images, orients, device)
    crops, keep = [], []
    for i, img in enumerate(decoded):
        if img is None:
            continue
        _, H, W = img.shape
        box = boxes[i]
        l, t = max(0, int(round(float(box[0])))), max(0, int(round(float(box[1]))))
        r, b = min(W, max(l + 1, int(round(float(box[2]))))), min(H, max(t + 1, int(round(float(box[3])))))
        x = img[:, t:b, l:r][None].float()
        x = F.interpolate(x, size=(S, S), mode="bicubic", antialias=True, align_corners=False)
        x = x.round_().clamp_(0, 255).to(torch.uint8)[0]
        if flips[i]:
            x = x.flip(-1)
        crops.append(x)
        keep.append(i)
    x = torch.stack(crops) if crops else torch.empty((0, 3, S, S), dtype=torch.uint8, device=device)
    x = patchify(x, p)  # (B', 3, S, S) -> (B', L, p*p*3)
    return x, np.asarray(keep, np.int64), len(images) - len(crops)
