"""Namespaced, honest metrics: stdout (rank 0, one line), TensorBoard, ``metrics.jsonl``.

Local files live in the worker's scratch directory and are copied to the run directory (local
or object storage) at each checkpoint and at the end, so a resumed run keeps its history.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time

import torch

from jobs.core.common import say
from pipeline.storage import Store

# Dense bf16 tensor-core peaks (FLOP/s) by device name; anything else is measured, never invented.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def measured_matmul_peak(device: torch.device, dtype=torch.float32, n: int = 512, seconds: float = 0.3) -> float:
    """FLOP/s of a square matmul on this device: the CPU's reference for MFU."""
    g = torch.Generator(device=device).manual_seed(0)  # never touch the training RNG streams
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(FLOP/s, how it was obtained)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if precision == "bf16":
            for k, v in GPU_PEAK_BF16.items():
                if k in name:
                    return v, f"{k} bf16 dense peak"
        return measured_matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32,
                                    n=4096), "measured matmul"
    return measured_matmul_peak(device), "measured fp32 matmul"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def local_state_mb(model, optimizer) -> float:
    """Bytes this rank holds for parameters and optimizer state (FSDP2 shards count locally)."""
    def nbytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    total = sum(nbytes(p) for p in model.parameters())
    for st in optimizer.state.values():
        total += sum(nbytes(v) for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    return total / 2**20


def fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class StepWindow:
    """What this rank's steps since the last log add up to; :meth:`close` averages them over the
    ranks (one small all-reduce) into the log step's metrics and starts the next window.

    Loss and the non-finite flags stay on the device between logs (no host sync per step)."""

    def __init__(self, device: torch.device, *, world: int, global_batch: int, flops_per_image: float,
                 precision: str, gpu_decode: bool = False):
        self.device, self.world, self.global_batch = device, world, global_batch
        self.flops_per_image, self.gpu_decode = flops_per_image, gpu_decode
        self.peak_fl, self.peak_how = peak_flops(device, precision)
        self.reset()

    def reset(self) -> None:
        self.t0, self.wait, self.steps = time.perf_counter(), 0.0, 0
        self.loss = torch.zeros((), device=self.device)
        self.bad = torch.zeros((), device=self.device)        # steps skipped as non-finite
        self.first_bad = torch.zeros((), device=self.device)  # the first of them (0: none)
        self.device_skips, self.device_decode_s = 0, 0.0      # data.decode=gpu: skips, decode time

    def add_step(self, loss: torch.Tensor, bad: torch.Tensor, step: int) -> None:
        """One optimizer step ``step`` (1-based) done: its mean micro-batch loss and skip flag."""
        self.loss += loss
        self.bad += bad
        self.first_bad = torch.where((self.first_bad == 0) & (bad > 0), float(step), self.first_bad)
        self.steps += 1

    def close(self, *, step: int, total: int, lr: float, rows_per_epoch: int, model, opt) -> dict:
        """-> the window's metrics (``_``-prefixed entries are the loop's own, not logged)."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        bad, first_bad = int(self.bad), int(self.first_bad)  # the same on every rank
        t = torch.tensor([float(self.loss), self.wait], dtype=torch.float64, device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
        loss_sum, wait_sum = t.tolist()
        steps = max(1, self.steps)
        ips = self.steps * self.global_batch / elapsed
        m = {"loss": loss_sum / self.world / steps, "lr": lr, "step": step,
             "epoch": step * self.global_batch / rows_per_epoch, "images_seen": step * self.global_batch,
             "throughput/images_per_s": ips, "throughput/data_wait_share": wait_sum / self.world / elapsed,
             "mfu": ips * self.flops_per_image / (self.peak_fl * self.world),
             "memory/peak_mb": peak_memory_mb(self.device), "memory/param_optim_mb": local_state_mb(model, opt),
             "_skipped": bad, "_first_bad": first_bad, "_eta_s": (total - step) * elapsed / steps}
        if self.gpu_decode:
            m.update({"data/device_decode_skips": self.device_skips,
                      "throughput/device_decode_share": self.device_decode_s / elapsed})
        self.reset()
        return m

    def line(self, m: dict, total: int) -> str:
        """The log step's one line on stdout."""
        knn = f" knn {100 * m['knn_top1']:.1f}%" if "knn_top1" in m else ""
        return (f"[mae] step {m['step']}/{total} epoch {m['epoch']:.2f} loss {m['loss']:.4f}{knn} lr {m['lr']:.2e} "
                f"{m['throughput/images_per_s']:.1f} img/s data-wait {100 * m['throughput/data_wait_share']:.0f}% "
                f"mfu {100 * m['mfu']:.1f}% ({self.peak_how}) mem {m['memory/peak_mb']:.0f}MB "
                f"eta {fmt_eta(m['_eta_s'])}")


def _step_of(line: bytes) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a torn or foreign line: not kept
        return math.inf


class MetricsLogger:
    """Rank 0 only. ``log`` writes local files; ``sync`` copies them to the run directory (a
    :class:`~pipeline.storage.Store`) at checkpoints and at the end, so a resumed run keeps its history."""

    def __init__(self, local_dir: str, run: Store, total_steps: int):
        self.local_dir, self.run, self.total_steps = local_dir, run, total_steps
        os.makedirs(local_dir, exist_ok=True)
        self.jsonl = os.path.join(local_dir, "metrics.jsonl")
        self._pull_history()
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(local_dir, "tb"))
        except Exception:  # noqa: BLE001 - TensorBoard is optional at run time
            self.tb = None

    def _same_place(self) -> bool:
        # An object-store key never equals the local scratch path; a local run dir might.
        return self.run.uri.scheme == "file" and os.path.abspath(self.run.path) == os.path.abspath(self.local_dir)

    def _pull_history(self) -> None:
        if not self._same_place():
            raw = self.run.read_if_exists("metrics.jsonl")
            if raw is not None:
                with open(self.jsonl, "wb") as f:
                    f.write(raw)

    def keep_until(self, step: int) -> None:
        """A resumed attempt: drop the records after the checkpoint it resumed from (an attempt that
        died after a metrics sync but before that save completed logged steps that are redone now)."""
        if not os.path.exists(self.jsonl):
            return
        with open(self.jsonl, "rb") as f:
            lines = f.read().splitlines(keepends=True)
        kept = [x for x in lines if _step_of(x) <= step]
        if len(kept) != len(lines):
            with open(self.jsonl, "wb") as f:
                f.writelines(kept)

    def log(self, step: int, metrics: dict, line: str | None = None) -> None:
        rec = {"step": step, "time": time.time(), **metrics}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if line:
            say(line)

    def image(self, step: int, name: str, img) -> None:
        """An (H, W, 3) uint8 picture as a TensorBoard image summary."""
        if self.tb is not None:
            self.tb.add_image(name, img, step, dataformats="HWC")
            self.tb.flush()

    def sync_tb(self) -> None:
        """The TensorBoard event files to the run directory (from the tracking thread, at log
        cadence: ``tensorboard --logdir <run>/tb`` shows a running job)."""
        tb = os.path.join(self.local_dir, "tb")
        if self._same_place() or not os.path.isdir(tb):
            return
        for fn in os.listdir(tb):
            self.run.put(os.path.join(tb, fn), f"tb/{fn}")

    def sync(self) -> None:
        if self._same_place():
            return
        # A run that stops before its first log line (non-finite at the first log step, a crash)
        # has no metrics.jsonl yet: syncing nothing must not replace the run's real error.
        if os.path.exists(self.jsonl):
            self.run.put(self.jsonl, "metrics.jsonl")
        self.sync_tb()

    def snapshot(self):
        """The metrics log as it is now (read here, on the training thread: a few KB to MB of
        local file) -> a callable that uploads it and the TensorBoard files from any thread: a
        checkpoint's upload thread calls it before the checkpoint's marker, so a complete checkpoint
        implies its metrics are stored, and the training loop never waits on that upload."""
        if self._same_place():
            return lambda: None
        raw = open(self.jsonl, "rb").read() if os.path.exists(self.jsonl) else None

        def upload():
            if raw is not None:
                self.run.write("metrics.jsonl", raw)
            self.sync_tb()
        return upload

    def put_file(self, local_path: str, name: str) -> str:
        self.run.put(local_path, name)
        return self.run.uri_of(name)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
