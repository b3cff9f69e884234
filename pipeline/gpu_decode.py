"""``data.decode: gpu``: JPEG decode, crop, resize, flip and patchify on the training worker's device.

At thousands of images per second per GPU, CPU decode needs 16-28 cores per GPU
(``docs/scaling.md``). In this mode the Ray Data task does only the cheap half of the CPU path:
it reads the bytes, opens the header (size, EXIF orientation, the checks of ``open_image``) and
draws the crop box and flip with the same per-row seed as the CPU path
(:func:`pipeline.dataset._row_rng`), so both modes see the same crops. It ships the encoded bytes
(about 1/10 of the decoded crop) with the box. The training worker then decodes the batch with
nvJPEG (``torchvision.io.decode_jpeg`` on a list, one batched call), crops, resizes (antialiased
bicubic), flips and patchifies on the device into the same uint8 ``[B, L, p*p*3]`` as the CPU path.

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
from .decode import SkipImage, decode
from .patchify import patchify

JPEG_MAGIC = b"\xff\xd8"


def _decode_all(images: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Encoded images -> CHW uint8 RGB tensors on ``device`` (None: undecodable). JPEGs in one
    batched call (one call per image only when the batch holds a broken one); others on the CPU."""
    from torchvision.io import ImageReadMode, decode_jpeg
    out: list[torch.Tensor | None] = [None] * len(images)
    jpegs = [i for i, d in enumerate(images) if d[:2] == JPEG_MAGIC]
    raw = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in jpegs]
    kw = {"mode": ImageReadMode.RGB, "device": device, "apply_exif_orientation": True}
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
        out[i] = img
    for i, d in enumerate(images):
        if out[i] is not None:
            continue
        # not a JPEG, or one the device decoder refuses (CMYK, ...): the CPU path's decoder
        # (modes, alpha, 16-bit, EXIF), then the same device code
        try:
            arr = np.asarray(decode(bytes(d)))
            out[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(device)
        except SkipImage:
            pass
    return out


def decode_on_device(images: list[bytes], boxes: np.ndarray, flips: np.ndarray, *, img_size: int,
                     patch_size: int, device: torch.device) -> tuple[torch.Tensor, np.ndarray, int]:
    """images: encoded bytes [B]; boxes: float [B, 4] (l, t, r, b) in displayed pixels; flips: bool
    [B] -> (uint8 patches [B', L, p*p*3] on ``device``, indices of the kept rows [B'], skipped count).

    Crop as :func:`pipeline.transforms.resize_crop_chw` rounds the box; resize by antialiased bicubic
    in float (torch's uint8 kernel is CPU-only), rounded back to uint8.
    """
    S, p = img_size, patch_size
    decoded = _decode_all(list(images), device)
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
