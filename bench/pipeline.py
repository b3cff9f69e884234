"""Pipeline throughput per CPU core: S3 server -> uint8 patch batches, against the baseline a
user would write, and the decode-only ceiling, in one run.

- ours:     prepared Parquet shards on the S3 server -> Ray Data (read + decode + RandomResizedCrop
            + flip + patchify, fused, uint8) -> iter_batches on the driver.
- baseline: torch DataLoader(num_workers = cores) over the same images as single objects, read
            with s3fs, PIL decode, torchvision RandomResizedCrop(224, (0.2, 1), bicubic) + flip +
            ToTensor (float32), default collate.
- ceiling:  PIL decode (to RGB) of the same bytes in a loop, one process per core at once.

Images: JPEGs of ImageNet-like size (500x375, quality 90). Starts its own SeaweedFS on 127.0.0.1.

    python -m bench.pipeline [--images 800] [--cores 2]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np

from tests.support import RAY_LOCAL_ENV, apply_ray_env, upload_dir


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


def _decode_all(datas: list[bytes]) -> tuple[float, float]:
    from PIL import Image
    t0, c0 = time.perf_counter(), time.process_time()
    for d in datas:
        Image.open(io.BytesIO(d)).convert("RGB")
    return time.perf_counter() - t0, time.process_time() - c0


def ceiling(datas: list[bytes], cores: int) -> tuple[float, float]:
    """-> (img/s per core, CPU-ms per image) of PIL decode to RGB in a loop, in ``cores``
    processes at once: the machine as loaded as when the pipelines run (on a VM whose vCPUs share
    physical cores, one decoding process alone runs each image faster than two side by side)."""
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(cores) as pool:  # not fork: Ray's threads are running
        res = pool.map(_decode_all, [datas] * cores)
    n = len(datas) * cores
    return n / sum(w for w, _ in res), 1e3 * sum(c for _, c in res) / n


class CpuMeter:
    """CPU seconds (user + system) of a process and all its descendants over a window, and of
    other process trees (the S3 server) kept apart. A thread polls every 0.2 s and keeps the last
    value seen per process, so processes that start or exit inside the window count too (an exited
    process's last 0.2 s may be missed). The polling thread's own CPU (psutil over every process,
    ~0.45 ms per image here) is taken out of this process's figure: it is the meter, not the pipeline."""

    def __init__(self, roots: dict[str, int], every: float = 0.2):
        import threading
        self.roots, self.every = roots, every
        self.seen: dict[str, dict[int, float]] = {k: {} for k in roots}
        self.base: dict[str, dict[int, float]] = {}
        self.names: dict[int, str] = {}
        self.own = 0.0  # CPU seconds of the polling thread itself
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _poll(self) -> None:
        import psutil
        for name, pid in self.roots.items():
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            # another root's tree inside this one's (the S3 server, a child of this process) is not this one's
            others = {r for k, r in self.roots.items() if k != name and pid in self._ancestors_of(r)}
            procs = [p for p in procs if p.pid not in others and not (others & self._ancestors(p))]
            for p in procs:
                try:
                    t = p.cpu_times()
                    self.seen[name][p.pid] = t.user + t.system
                    kind = self._name(p)  # a Ray worker between two tasks is "ray::IDLE": keep its task's name
                    if kind != "ray::IDLE" or p.pid not in self.names:
                        self.names[p.pid] = kind
                except psutil.Error:
                    pass

    @staticmethod
    def _ancestors(p) -> set[int]:
        try:
            return {a.pid for a in p.parents()}
        except Exception:  # noqa: BLE001 - gone meanwhile
            return set()

    @staticmethod
    def _ancestors_of(pid: int) -> set[int]:
        import psutil
        try:
            return CpuMeter._ancestors(psutil.Process(pid))
        except psutil.Error:
            return set()

    @staticmethod
    def _name(p) -> str:
        cmd = p.cmdline()
        if p.pid == os.getpid():
            return "consumer (this process)"
        title = " ".join(cmd)
        if title.startswith("ray::"):
            return title.split()[0]
        for k in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "monitor.py"):
            if k in title:
                return k
        return os.path.basename(cmd[0]) if cmd else p.name()

    def top(self, name: str, n: int = 8) -> list[tuple[str, float]]:
        """CPU seconds by process kind (summed over processes of one kind), largest first."""
        out = {}
        for pid, v in self.seen[name].items():
            k = self.names.get(pid, "?")
            out[k] = out.get(k, 0.0) + self._used(name, pid, v)
        return sorted(out.items(), key=lambda kv: -kv[1])[:n]

    def _run(self) -> None:
        t0 = time.thread_time()
        while not self._stop.wait(self.every):
            self._poll()
        self.own = time.thread_time() - t0

    def _used(self, name: str, pid: int, v: float) -> float:
        return v - self.base.get(name, {}).get(pid, 0.0) - (self.own if pid == os.getpid() else 0.0)

    def __enter__(self):
        self._poll()
        self.base = {k: dict(v) for k, v in self.seen.items()}
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._poll()

    def cpu_s(self, name: str) -> float:
        return sum(self._used(name, pid, v) for pid, v in self.seen[name].items())


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


def baseline(keys, endpoint, cores, batch, server_pid, epochs=1) -> dict:
    import torch
    ds = S3ImageDataset(keys, endpoint)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=cores, shuffle=True,
                                     persistent_workers=True, prefetch_factor=4)
    n = 0
    it = iter(dl)  # worker start-up outside the timed region, as for ours
    next(it)
    with CpuMeter({"pipeline": os.getpid(), "s3": server_pid}) as cpu:
        t0 = time.perf_counter()
        for _ in range(epochs):
            for b in it:
                n += b.shape[0]
            it = iter(dl)
        wall = time.perf_counter() - t0
    return {"images": n, "img_s": n / wall, "cpu_ms": 1e3 * cpu.cpu_s("pipeline") / n, "s3_ms": 1e3 * cpu.cpu_s("s3") / n,
            "top": [(k, 1e3 * v / n) for k, v in cpu.top("pipeline")]}


def ours(shards_uri, batch, server_pid, epochs=1) -> dict:
    """One execution over 1 + ``epochs`` epochs (the training stream's shape: no gap between epochs),
    CPU of every process of the pipeline: decode tasks, Ray's own processes and this consumer."""
    from pipeline.config import DataConfig
    from pipeline.dataset import build_dataset
    cfg = DataConfig(source=shards_uri, img_size=224, patch_size=16, decode_batch_size=32)
    ds, _, stream = build_dataset(cfg, epochs=epochs + 1)
    it = iter(ds.iter_batches(batch_size=batch, batch_format="numpy", prefetch_batches=4))
    n = 0
    while n < stream.rows_per_epoch:  # the first epoch warms up (process start-up): untimed
        n += len(next(it)["patches"])
    n = 0
    with CpuMeter({"pipeline": os.getpid(), "s3": server_pid}) as cpu:
        t0 = time.perf_counter()
        for b in it:
            n += len(b["patches"])
        wall = time.perf_counter() - t0
    return {"images": n, "img_s": n / wall, "cpu_ms": 1e3 * cpu.cpu_s("pipeline") / n, "s3_ms": 1e3 * cpu.cpu_s("s3") / n,
            "top": [(k, 1e3 * v / n) for k, v in cpu.top("pipeline")]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--skip-baseline", action="store_true", help="measure ours and the decode-only cost only")
    a = ap.parse_args()
    apply_ray_env(RAY_LOCAL_ENV)
    from tests.s3server import S3Server
    server = S3Server()
    tmp = tempfile.mkdtemp(prefix="mae-bench-")
    try:
        os.environ.update(server.env())
        # Both pipelines talk to the S3 server directly (the baseline is given server.endpoint): the
        # tests' request-counting proxy runs in this process, so through it its byte forwarding
        # would be counted as our consumer's CPU.
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint
        server.create_bucket("bench")
        datas = make_images(a.images, os.path.join(tmp, "raw"))
        print(f"{a.images} JPEGs 500x375 q90, mean {np.mean([len(d) for d in datas]) / 1024:.0f} KB; "
              f"{a.cores} cores", flush=True)
        upload_dir(os.path.join(tmp, "raw"), "s3://bench/raw")
        from jobs.core.common import init_ray
        init_ray(num_cpus=a.cores)
        from pipeline.prepare import PrepareConfig, prepare
        prepare(PrepareConfig(src="s3://bench/raw", dst="s3://bench/shards", shard_size_mb=16), progress=False)

        ceil, dec_ms = ceiling(datas, a.cores)
        o = ours("s3://bench/shards", a.batch, server.proc.pid, a.epochs)
        import ray
        ray.shutdown()  # the baseline gets the cores to itself
        keys = [f"bench/raw/{i:06d}.jpg" for i in range(a.images)]
        b = None if a.skip_baseline else baseline(keys, server.endpoint, a.cores, a.batch, server.proc.pid, a.epochs)
    finally:
        server.stop()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    per = a.cores
    print(f"decode-only (PIL to RGB, {per} procs): {ceil:6.1f} img/s per core, {dec_ms:6.2f} CPU-ms per image")
    print(f"ours, CPU per image / decode-only: {o['cpu_ms'] / dec_ms:8.2f}x (goal: within 1.7x)")
    if b is None:
        print("  ours CPU-ms per image by process: " + ", ".join(f"{k} {v:.2f}" for k, v in o["top"]))
        return
    for name, r in (("baseline DataLoader (s3fs, PIL)", b), ("ours (Ray Data, uint8 patches)", o)):
        print(f"{name + ':':34s} {r['img_s'] / per:8.1f} img/s per core ({r['img_s']:.1f} total), "
              f"{r['cpu_ms']:6.2f} CPU-ms per image = {r['cpu_ms'] / dec_ms:4.2f}x decode-only "
              f"(+ S3 server {r['s3_ms']:.2f})")
    for name, r in (("baseline", b), ("ours", o)):
        print(f"  {name} CPU-ms per image by process: " + ", ".join(f"{k} {v:.2f}" for k, v in r["top"]))
    print(f"ratio ours / DataLoader, img/s:    {o['img_s'] / b['img_s']:8.2f}x")
    print(f"ratio ours / DataLoader, CPU:      {b['cpu_ms'] / o['cpu_ms']:8.2f}x less CPU per image")


if __name__ == "__main__":
    main()
