"""Pipeline throughput per CPU core: S3 server -> uint8 patch batches, against the baseline a
user would write, and the decode-only ceiling, in one run.

- ours:     prepared Parquet shards on the S3 server -> Ray Data (read + decode + RandomResizedCrop
            + flip + patchify, fused, uint8) -> iter_batches on the driver.
- baseline: torch DataLoader(num_workers = cores) over the same images as single objects, read
            with s3fs, PIL decode, torchvision RandomResizedCrop(224, (0.2, 1), bicubic) + flip +
            ToTensor (float32), default collate.
- ceiling:  PIL decode (to RGB) of the same bytes in a loop, one core.

Images: JPEGs of ImageNet-like size (500x375, quality 90). Starts its own SeaweedFS on 127.0.0.1.

    python bench/pipeline.py [--images 800] [--cores 2]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def natural_like(rng: np.random.Generator, w=500, h=375) -> np.ndarray:
    """Smooth structure + texture, so JPEG sizes land near ImageNet's (~100 KB at q90)."""
    from PIL import Image
    base = rng.random((h // 16 + 1, w // 16 + 1, 3)) * 255
    img = np.asarray(Image.fromarray(base.astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    img += 40 * np.sin(xx / rng.uniform(3, 9) + yy / rng.uniform(3, 9))[..., None]
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_images(n: int, root: str) -> list[bytes]:
    from pipeline.synthetic import encode
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    out = []
    for i in range(n):
        data = encode(natural_like(rng), "JPEG", quality=90)
        with open(os.path.join(root, f"{i:06d}.jpg"), "wb") as f:
            f.write(data)
        out.append(data)
    return out


def ceiling(datas: list[bytes]) -> float:
    from PIL import Image
    t0 = time.perf_counter()
    for d in datas:
        Image.open(io.BytesIO(d)).convert("RGB")
    return len(datas) / (time.perf_counter() - t0)


class S3ImageDataset:
    """The baseline's dataset: one object per image, read with s3fs in the worker."""

    def __init__(self, keys, endpoint):
        self.keys, self.endpoint, self.fs = keys, endpoint, None
        from torchvision import transforms as T
        self.tf = T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                             T.RandomHorizontalFlip(), T.ToTensor()])

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        from PIL import Image
        if self.fs is None:
            import s3fs
            self.fs = s3fs.S3FileSystem(endpoint_url=self.endpoint)
        img = Image.open(io.BytesIO(self.fs.cat_file(self.keys[i]))).convert("RGB")
        return self.tf(img)


def baseline(keys, endpoint, cores, batch, epochs=1) -> float:
    import torch
    ds = S3ImageDataset(keys, endpoint)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=cores, shuffle=True,
                                     persistent_workers=True, prefetch_factor=4)
    n = 0
    it = iter(dl)  # worker start-up outside the timed region, as for ours
    next(it)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for b in it:
            n += b.shape[0]
        it = iter(dl)
    return n / (time.perf_counter() - t0)


def ours(shards_uri, batch, epochs=1) -> float:
    from pipeline.dataset import DataConfig, build_dataset
    cfg = DataConfig(source=shards_uri, img_size=224, patch_size=16, decode_batch_size=32)
    ds, _, _ = build_dataset(cfg)
    it = ds.iter_batches(batch_size=batch, batch_format="numpy")
    first = next(iter(it))  # pipeline start-up outside the timed region
    assert first["patches"].dtype == np.uint8
    n = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for b in ds.iter_batches(batch_size=batch, batch_format="numpy", prefetch_batches=4):
            n += len(b["patches"])
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from s3server import S3Server
    server = S3Server()
    try:
        os.environ.update(server.env())
        server.create_bucket("bench")
        tmp = tempfile.mkdtemp(prefix="mae-bench-")
        datas = make_images(a.images, os.path.join(tmp, "raw"))
        print(f"{a.images} JPEGs 500x375 q90, mean {np.mean([len(d) for d in datas]) / 1024:.0f} KB; "
              f"{a.cores} cores", flush=True)
        from conftest import upload_dir
        upload_dir(os.path.join(tmp, "raw"), "s3://bench/raw")
        from jobs.core.common import init_ray
        init_ray(num_cpus=a.cores)
        from pipeline.prepare import PrepareConfig, prepare
        prepare(PrepareConfig(src="s3://bench/raw", dst="s3://bench/shards", shard_size_mb=16), progress=False)

        ceil = ceiling(datas)
        r_ours = ours("s3://bench/shards", a.batch, a.epochs)
        import ray
        ray.shutdown()  # the baseline gets the cores to itself
        keys = [f"bench/raw/{i:06d}.jpg" for i in range(a.images)]
        r_base = baseline(keys, server.endpoint, a.cores, a.batch, a.epochs)
    finally:
        server.stop()
    per = a.cores
    print(f"decode-only ceiling (1 core):     {ceil:8.1f} img/s per core")
    print(f"baseline DataLoader (s3fs, PIL):  {r_base / per:8.1f} img/s per core ({r_base:.1f} total)")
    print(f"ours (Ray Data, uint8 patches):   {r_ours / per:8.1f} img/s per core ({r_ours:.1f} total)")
    print(f"ratio ours / DataLoader:          {r_ours / r_base:8.2f}x")
    print(f"ours / decode-only ceiling:       {100 * r_ours / per / ceil:7.0f}%")


if __name__ == "__main__":
    main()
