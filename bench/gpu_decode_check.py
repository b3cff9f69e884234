"""data.decode=gpu on one GPU: nvJPEG decode + crop + resize + flip + patchify of 500x375 JPEGs at
batch 256 (``pipeline.gpu_decode.decode_on_device``), images/s; beside it the CPU mode's cost per
image on this machine's CPU. Needs torch and torchvision (no Ray).

    python -m bench.gpu_decode_check [--batch 256] [--iters 10] [--out gpu_decode.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch
    try:
        import torchvision  # noqa: F401
    except ImportError:
        print("gpu decode: skipped (torchvision is not installed here)")
        return
    from bench.decode_modes import photos
    from pipeline.gpu_decode import crop_plan, decode_on_device
    from pipeline.transforms import TransformConfig
    cfg = TransformConfig(img_size=224, patch_size=16)
    imgs = photos(a.batch)
    plans = [crop_plan(d, cfg, np.random.default_rng(i)) for i, d in enumerate(imgs)]
    boxes = np.asarray([p[0] for p in plans], np.float32)
    flips = np.asarray([p[1] for p in plans])
    dev = torch.device("cuda")
    for _ in range(2):
        decode_on_device(imgs, boxes, flips, img_size=224, patch_size=16, device=dev)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.iters):
        x, _, skipped = decode_on_device(imgs, boxes, flips, img_size=224, patch_size=16, device=dev)
    torch.cuda.synchronize()
    ips = a.batch * a.iters / (time.perf_counter() - t0)
    res = {"device": torch.cuda.get_device_name(), "batch": a.batch, "img_per_s": round(ips, 1),
           "ms_per_batch": round(a.batch / ips * 1e3, 2), "skipped": skipped, "shape": list(x.shape)}
    print("gpu decode (500x375 JPEG -> 224 px ViT-B/16 patches):", res, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
