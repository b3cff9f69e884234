"""What the tests and the benches share: the environment of a local Ray, the tiny pretraining config,
uploading a folder to object storage, and a job run beside another.

Importable as ``support`` (pytest puts tests/ on ``sys.path``) and as ``tests.support`` (the benches,
run as ``python -m bench.NAME`` from the repository root). It imports nothing heavy at module level:
the environment below must be set before Ray is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobs.core.config import PretrainConfig

RAY_LOCAL_ENV: dict[str, str] = {
    "RAY_AUTH_MODE": "disabled",  # a local head needs no token
    # Without this, ray.init(address="127.0.0.1:port") "canonicalizes" the loopback address to the
    # machine's outward IP; the tests and benches must only ever talk to 127.0.0.1.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",  # no phone-home
    "AWS_EC2_METADATA_DISABLED": "true",  # never probe 169.254.169.254
}
"""What every local Ray of the tests and benches runs with: loopback only, no token, no phone-home.
The benches take only these: what they measure is Ray with its own defaults."""

RAY_TEST_ENV: dict[str, str] = {
    **RAY_LOCAL_ENV,
    # No Prometheus metrics export from every Ray process to its node's agent (nothing here reads
    # them): on 2 cores, the idle test cluster costs 12% of a core without it and 21% with it,
    # and every run's worker processes pay it again.
    "RAY_enable_metrics_collection": "0",
    # Each node's log monitor globs the logs directory for new files every 0.1 s while nothing is
    # printed; with this, every 0.5 s (its own back-off once a directory holds many files). On the
    # idle 2-node cluster: the two monitors cost 1.1% of a core instead of 2.7%.
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "RAY_TRAIN_V2_ENABLED": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Test-speed settings of Ray Train V2 (read by its controller, which inherits this environment):
    # poll the workers every 0.5 s instead of 2 s (each report and each run's end waits for a poll),
    # and no preemption watcher (one actor process less per run; the one test of a preemption turns
    # it on for its run).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",  # Ray Train's own Prometheus gauges: not read by the tests
    # Keep idle worker processes (default: any above the node's CPU count are killed after 1 s
    # idle): a decode task's worker has imported torch (~4 CPU-s); without this every run pays it again.
    "RAY_num_workers_soft_limit": "10",
    # Weights & Biases: runs stay on disk (no account, no network), quietly
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
}
"""The test suite's environment: ``RAY_LOCAL_ENV`` and the settings that make its many small Ray
runs cheaper on a 2-core machine."""


def apply_ray_env(env: Mapping[str, str] = RAY_TEST_ENV) -> None:
    """Put ``env`` into ``os.environ``, each variable only where it is not set already; call it
    before Ray starts, so that every Ray process (and every Ray worker) inherits it."""
    for k, v in env.items():
        os.environ.setdefault(k, v)


MICRO: tuple[str, ...] = (
    "model.preset=mae_vit_micro_patch4", "train.batch_size=8", "train.vis_images=0", "scaling.num_workers=2",
)
"""Every tiny run: the micro model (32x32 images, 4x4 patches) on batches of 8 per worker, 2
workers, no reconstruction pictures."""

SHORT_RUN: tuple[str, ...] = (
    "data.decode_batch_size=8", "data.rows_per_unit=16", "data.shuffle_buffer=32", "train.log_every=1",
    "optim.base_lr=0.02", "optim.warmup_steps=2", "optim.clip_grad=1.0",
)
"""A short training run on a few hundred images: small read and decode units (the first batch
comes soon), a log line at every step, and a learning rate that moves the loss within a few steps."""


def tiny_overrides(source: str, storage_path: str | None, name: str | None, *extra: str,
                   short_run: bool = True) -> list[str]:
    """The ``section.field=value`` overrides of a tiny run, as the CLI, a submitted job or a
    subprocess takes them: ``MICRO``, then ``SHORT_RUN`` (unless ``short_run=False``: the library's
    data, logging and optimizer defaults), then the data source, the run's storage path and name
    (``None``: left at their defaults), then ``extra``. Later overrides win (``jobs.core.config.load``
    applies them in order), so ``extra`` changes any of the above."""
    return [*MICRO, *(SHORT_RUN if short_run else ()), f"data.source={source}",
            *([f"run.storage_path={storage_path}"] if storage_path is not None else []),
            *([f"run.name={name}"] if name is not None else []), *extra]


def tiny_config(source: str, storage_path: str | None, name: str | None, *overrides: str,
                short_run: bool = True) -> PretrainConfig:
    """The validated config of ``tiny_overrides(source, storage_path, name, *overrides, short_run=...)``."""
    from jobs.core.config import load
    return load(None, tiny_overrides(source, storage_path, name, *overrides, short_run=short_run))


def upload_dir(local: str, s3_uri: str) -> None:
    """Copy the local folder ``local`` (recursively) to ``s3_uri``: a source as a user's bucket holds it."""
    from pipeline.storage import fsspec_fs
    fs, p = fsspec_fs(s3_uri)
    fs.put(local.rstrip("/") + "/", p, recursive=True)


class Background:
    """``fn()`` in a thread of this process, started by :meth:`start` (or by :meth:`result`, which
    waits for it and returns its value, or raises its exception)."""

    def __init__(self, fn):
        import threading
        self.out: dict = {}
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)

    def _run(self, fn):
        try:
            self.out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller of result()
            self.out["error"] = e

    def start(self):
        if self.thread.ident is None:
            self.thread.start()

    def result(self):
        self.start()
        self.thread.join()
        if "error" in self.out:
            raise self.out["error"]
        return self.out["value"]
