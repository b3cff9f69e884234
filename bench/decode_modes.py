"""CPU cost per image of the two decode modes, side by side on the same JPEGs (500x375, the size
of a typical ImageNet photo), one thread, no Ray.

- cpu mode, in the decode task: header, crop draw, DCT-reduced decode, crop, antialiased bicubic
  resize to 224, flip, patchify (``pipeline.transforms.transform_image``).
- gpu mode, in the decode task: header and crop draw only (``pipeline.gpu_decode.crop_plan``); the
  pixels are decoded on the training worker's GPU. The same batch decoded by that code on the CPU
  device (``decode_on_device(device="cpu")``) is printed too, as the cost the GPU takes over.

Prints per-image CPU milliseconds and the ratio, and the decode-task cores a GPU needs at a given
rate: ``cores = img/s x ms / 1000``. Run: ``python -m bench.decode_modes [--n 200] [--rate 4000]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def photos(n: int, seed: int = 0) -> list[bytes]:
    """Photo-like 500x375 JPEGs (smooth gradients + texture + noise, quality 90)."""
    from pipeline.synthetic import encode
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0.005, 0.05, 3)
        base = np.stack([np.sin(xx * a + yy * b), np.cos(yy * c), np.sin((xx + yy) * (a + c))], -1)
        img = (127 + 90 * base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        out.append(encode(img, "JPEG", quality=90))
    return out


def cpu_ms(fn, items, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for i, x in enumerate(items):
            fn(i, x)
        best = min(best, (time.process_time() - t0) / len(items) * 1000)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--rate", type=float, default=4000.0, help="images/s per GPU, for the cores estimate")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    from pipeline.gpu_decode import crop_plan, decode_on_device
    from pipeline.transforms import TransformConfig, transform_image
    cfg = TransformConfig(img_size=224, patch_size=16)
    imgs = photos(a.n)
    full = cpu_ms(lambda i, d: transform_image(d, cfg, np.random.default_rng(i)), imgs)
    plan = cpu_ms(lambda i, d: crop_plan(d, cfg, np.random.default_rng(i)), imgs)
    plans = [crop_plan(d, cfg, np.random.default_rng(i)) for i, d in enumerate(imgs)]
    boxes = np.asarray([p[0] for p in plans], np.float32)
    flips = np.asarray([p[1] for p in plans])
    t0 = time.process_time()
    decode_on_device(imgs, boxes, flips, img_size=224, patch_size=16, device=torch.device("cpu"))
    device_path_on_cpu = (time.process_time() - t0) / len(imgs) * 1000
    print(f"{a.n} JPEGs 500x375, ViT-B/16 crops (224 px), one thread, CPU ms per image:")
    print(f"  cpu mode, decode task (decode + crop + resize + patchify): {full:6.2f} ms")
    print(f"  gpu mode, decode task (header + crop draw):                {plan:6.2f} ms")
    print(f"  ratio: {full / plan:.0f}x less CPU in the decode tasks with data.decode=gpu")
    print(f"  (the device path run on the CPU device, for reference:    {device_path_on_cpu:6.2f} ms)")
    print(f"decode-task cores per GPU at {a.rate:.0f} img/s: cpu mode {a.rate * full / 1000:.1f}, "
          f"gpu mode {a.rate * plan / 1000:.2f}")


if __name__ == "__main__":
    main()
