"""The torch process group of a run, set up from processes that never import torch.

``TorchTrainer`` carries Ray's ``TorchConfig``, whose module imports torch at its top. The trainer
object travels to the Train controller actor, so that process imports torch (~4-5 CPU-s per run
on 2 cores) only to tell the workers to connect.
:class:`ProcessGroupConfig` drives the same steps as Ray's torch backend, in the same order, from
a module without torch: the steps themselves are Ray's own functions, imported and run on the
workers, where torch is loaded anyway. Used with ``ray.train.v2``'s ``DataParallelTrainer``.

Those steps are private to Ray: :mod:`pipeline.private_api` holds them, each with a test in
``tests/test_private_api.py``; what the controller saves is measured by ``bench/controller_torch.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig

from pipeline import private_api


@dataclass
class ProcessGroupConfig(BackendConfig):
    """``TorchConfig(backend=..., init_method="env", timeout_s=...)`` without torch in the caller.

    backend: "nccl" with GPUs, "gloo" on CPUs (what TorchTrainer picks for ``backend=None``)."""

    backend: str = "gloo"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return _ProcessGroupBackend

    @property
    def train_func_context(self):
        return _cuda_device

    @property
    def framework(self):
        return private_api.torch_framework()

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


# ---------------------------------------------------------------- run on the workers (torch there)
@contextlib.contextmanager
def _cuda_device():
    """Around the training function on each worker: Ray's own (sets the worker's CUDA device)."""
    with private_api.torch_worker_context():
        yield


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


def _set_dist_env() -> None:
    private_api.set_torch_dist_env()  # RANK, LOCAL_RANK, WORLD_SIZE, ... from the train context


def _init_process_group(**kwargs) -> None:
    private_api.setup_torch_process_group(**kwargs)  # NCCL async error handling included


def _shutdown(destroy_process_group: bool) -> None:
    private_api.shutdown_torch(destroy_process_group=destroy_process_group)


# ---------------------------------------------------------------- run on the controller (no torch)
class _ProcessGroupBackend(Backend):
    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group, backend_config: ProcessGroupConfig):
        """Ray's ``_TorchBackend.on_start`` for ``init_method="env"``: rank 0's address and a
        free port as the rendezvous, the torchrun variables, then every rank joins."""
        import ray
        addr, port = worker_group.execute_single(0, private_api.address_and_port)
        worker_group.execute(_set_master, addr=addr, port=port)
        worker_group.execute(_set_dist_env)
        n = len(worker_group)
        ray.get([worker_group.execute_single_async(i, _init_process_group, backend=backend_config.backend,
                                                   world_rank=i, world_size=n, init_method="env://",
                                                   timeout_s=backend_config.timeout_s) for i in range(n)])

    def on_shutdown(self, worker_group, backend_config: ProcessGroupConfig):
        import ray
        from ray.exceptions import GetTimeoutError
        timeout = private_api.torch_shutdown_timeout_s()
        futures = worker_group.execute_async(_shutdown, destroy_process_group=len(worker_group) > 1)
        try:
            ray.get(futures, timeout=timeout)
        except GetTimeoutError:  # as Ray's: a hung shutdown of the process group must not hold the run's end
            logging.getLogger(__name__).warning(f"torch process group shutdown timed out after {timeout} seconds")
