"""Every private Ray and torch symbol the project uses, in one place, each with a test.

Ray and torch keep these out of their public API and may rename or drop any of them in a minor
release. The rest of the project takes them from here only (``grep -rn "_private\\|_internal"``
finds nothing else outside ``tests/``), and ``tests/test_private_api.py`` checks each one exists
with the signature or attributes used here: an upgrade that breaks one fails that named test, in
seconds, without a cluster, instead of a run's process-group setup or resume on the cluster.

It lives in ``pipeline`` because that is the lowest of the project's packages (``jobs`` imports
``pipeline``, never the reverse) and ``pipeline/cluster.py`` needs one of these too. It imports
neither torch nor anything beyond ``ray``'s top level at module level: each symbol is imported
where it is used, by the function that uses it (the Train controller, Ray Data's coordinators and
a driver that decodes no images never import torch).

| symbol | here as, used by | why | if it disappears |
|---|---|---|---|
| `ray._private.ray_constants.ENABLE_RAY_CLUSTER` | `local_ray_loopback`, `jobs.core.common.init_ray` | a local Ray binds 127.0.0.1 only; the env variable is read at import, and ray may be imported already | `ray._private.services` reads it at node start: find the new switch, or set `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` before ray is imported and drop this |
| `ray.init(_node_ip_address=...)` | `local_init_kwargs`, `init_ray` (local Ray) | the local node on 127.0.0.1, never the machine's outward address | whatever `ray.init` then takes for the node's IP |
| `ray._private.utils.get_num_cpus` | `container_cpus`, `init_ray` (local Ray) | the container's CPUs (cgroup quota, affinity), as Ray counts them | `init_ray` already falls back to `os.cpu_count()`; read the cgroup's `cpu.max` |
| `ray._private.state.state.get_max_resources_from_cluster_config` | `autoscaler_max_resources`, `pipeline.cluster`, `jobs.core.placement` | the most an autoscaler may bring up (what Ray Data's own limits read) | already read as a fixed cluster (None); Ray's autoscaler SDK may grow a public call |
| `ray.train.v2._internal.util.TrainingFramework` | `torch_framework`, `jobs.core.backend` | our backend config says "torch" as Ray's `TorchConfig.framework` does | the value `TorchConfig.framework` returns then; or Ray's `TorchConfig` (torch in the controller) |
| `ray.train._internal.utils.get_address_and_port` | `address_and_port`, `jobs.core.backend` | rank 0's address and a free port: the torch rendezvous | `ray.util.get_node_ip_address()` and a socket bound to port 0 on rank 0 |
| `ray.train.torch.config._set_torch_distributed_env_vars` | `set_torch_dist_env`, `jobs.core.backend` | RANK, LOCAL_RANK, WORLD_SIZE, ... on each worker, as TorchTrainer sets them | set them from `ray.train.get_context()` |
| `ray.train.torch.config._setup_torch_process_group` | `setup_torch_process_group`, `jobs.core.backend` | `init_process_group` with Ray's NCCL settings (async error handling) | `dist.init_process_group(backend, "env://", rank, world_size, timeout)` |
| `ray.train.torch.config._shutdown_torch` | `shutdown_torch`, `jobs.core.backend` | the group destroyed and the CUDA cache emptied at the end | `dist.destroy_process_group()` |
| `ray.train.torch.config.TorchConfigContextManager` (undocumented) | `torch_worker_context`, `jobs.core.backend` | each worker's CUDA device set around the training function | `torch.cuda.set_device(ray.train.torch.get_device())` |
| `ray.train.constants.[DEFAULT_]TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S` (undocumented) | `torch_shutdown_timeout_s`, `jobs.core.backend` | the shutdown timeout (and its variable) TorchTrainer uses | a constant of our own (Ray's default: 30 s) |
| `ray.train.v2._internal.constants.AWS_RETRYABLE_TOKENS` | `ray_would_retry_upload`, `jobs.core.checkpointer` | an error holding one makes Ray run the upload function again; ours must run once per save | the fallback matches any "AWS Error"; read the retry rule of `TrainContext._upload_checkpoint` |
| `ray.train.Result(_storage_filesystem=...)` | `train_result`, `jobs.core.launch` | a finished run's result, read from its last checkpoint on that filesystem | drop it: the `Checkpoint` carries its filesystem |
| `ray._private.runtime_env.packaging`, `.working_dir` (logger names) | `RAY_PACKAGING_LOGGERS`, `jobs.submit` | one line per staged file, quieted | the chatter comes back; nothing breaks |
| `torch.distributed.checkpoint._fsspec_filesystem.FsspecReader` | `dcp_fsspec_reader`, `jobs.core.safeload` | DCP straight from object storage, each rank reading its byte ranges (not re-exported) | a `FileSystemReader` over an fsspec filesystem, or torch's public name for it |
| `FileSystemReader._get_metadata_path(rank)`, `.fs`, `.load_id` | `dcp_metadata_path`, `jobs.core.safeload` | `.metadata` opened for our allowlisting unpickler instead of `pickle` | the path is `<checkpoint>/.metadata` |
| `FileSystemReader.storage_data` (set in `set_up_storage_reader`), `.fs`, `.path`; `_StorageInfo.relative_path`, `.offset`, `.length`; `read_data` opening each file once with `self.fs.create_stream` and reading its items in the plan's order; the fsspec `FileSystem.fs` of an `FsspecReader` | `dcp_plan_in_file_order`, `dcp_file_ranges`, `dcp_fsspec_of`, `dcp_streams_from`, `jobs.core.safeload` | each rank fetches only the byte ranges of its items, in file order, a few ranged requests per file (torch's own reads went through a 50 MiB readahead in plan order: 2-4x the checkpoint per resume) | without them, `SafeFsspecReader.read_data` can fall back to torch's own (correct, more bytes); the byte-count tests then fail |
| `torch.distributed.checkpoint._traverse.set_element` | `dcp_set_element`, `jobs.core.safeload` | a non-tensor entry put back into the nested state dict, as DCP's planner does | copy `DefaultLoadPlanner.load_bytes`'s code of the new version |
| `DefaultLoadPlanner`'s `flatten_state_dict`, `mappings`, `original_state_dict`, `state_dict` | `jobs.core.safeload.SafeLoadPlanner` | the same, in our `load_bytes` (weights_only) | as above |
| `torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING`, `torch.distributed.checkpoint.filesystem._StorageInfo`, `torch.serialization._get_layout` | `DCP_PRIVATE_PICKLE_GLOBALS`, `jobs.core.safeload.METADATA_GLOBALS` | globals a DCP `.metadata` pickles, allowlisted by name | genuine checkpoints are refused: record what a new checkpoint pickles (see `METADATA_GLOBALS`) and allowlist that |
| `wandb.sdk.data_types._private` (not Ray or torch) | `import_wandb_media_tempdirs`, `jobs.core.tracking` | imported inside the attempt's scratch dir, so wandb's media temp dirs go with the attempt | they land in the system temp dir (left behind by a killed attempt) |

Not here: the tests' own private imports (``ray._private.node``/``.parameter`` in
``tests/privatenode.py``, ``ray._private.ray_constants`` in ``tests/test_kuberay.py``,
``ray.autoscaler._private.util`` in ``tests/test_infra.py``), which a Ray upgrade breaks in those
tests themselves; ``tests/test_private_api.py`` checks them too.

Why the project keeps its own process-group backend (:mod:`jobs.core.backend`) on these symbols
instead of Ray's public ``TorchConfig``: ``TorchConfig``'s module imports torch at its top, and
the config travels to the Train controller, which then imports torch only to tell the workers to
connect. Measured with ``python -m bench.controller_torch`` (``bench/RESULTS.md``).
"""

from __future__ import annotations

import contextlib
import os

# ---------------------------------------------------------------------------------------- Ray

RAY_PACKAGING_LOGGERS = ("ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir")
"""Loggers of Ray's runtime-env packaging (one line per staged file), quieted by ``mae submit``."""

LOCAL_NODE_IP_KW = "_node_ip_address"
"""``ray.init``'s keyword for the IP of the node it starts (private: leading underscore)."""


def local_ray_loopback() -> None:
    """A local Ray started from now on binds 127.0.0.1 only, also when ray is imported already
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is read once, at import)."""
    import ray._private.ray_constants as ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False


def local_init_kwargs(ip: str = "127.0.0.1") -> dict:
    """``ray.init`` keywords that put the node it starts on ``ip``."""
    return {LOCAL_NODE_IP_KW: ip}


def container_cpus() -> float:
    """The CPUs this container may use (cgroup quota, affinity), as Ray counts them."""
    from ray._private.utils import get_num_cpus
    return get_num_cpus()


def autoscaler_max_resources() -> dict | None:
    """The most of each resource the cluster's autoscaler may bring up; None: a fixed cluster (or
    a Ray without the call)."""
    try:
        from ray._private.state import state
        return state.get_max_resources_from_cluster_config() or None
    except Exception:  # noqa: BLE001 - an older/newer Ray without it: treat as fixed
        return None


def torch_framework():
    """Ray Train's tag for torch (what ``TorchConfig.framework`` returns)."""
    from ray.train.v2._internal.util import TrainingFramework
    return TrainingFramework.TORCH


def address_and_port() -> tuple[str, int]:
    """On a worker: this node's address and a free port (the torch rendezvous of rank 0)."""
    from ray.train._internal.utils import get_address_and_port
    return get_address_and_port()


def set_torch_dist_env() -> None:
    """On a worker: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, NODE_RANK from the Train context."""
    from ray.train.torch.config import _set_torch_distributed_env_vars
    _set_torch_distributed_env_vars()


def setup_torch_process_group(*, backend: str, world_rank: int, world_size: int, init_method: str,
                              timeout_s: int) -> None:
    """On a worker: ``init_process_group`` as TorchTrainer does it (NCCL async error handling)."""
    from ray.train.torch.config import _setup_torch_process_group
    _setup_torch_process_group(backend=backend, world_rank=world_rank, world_size=world_size,
                               init_method=init_method, timeout_s=timeout_s)


def shutdown_torch(destroy_process_group: bool) -> None:
    """On a worker: the process group destroyed (and the CUDA cache emptied), as TorchTrainer does."""
    from ray.train.torch.config import _shutdown_torch
    _shutdown_torch(destroy_process_group=destroy_process_group)


def torch_worker_context():
    """On a worker: the context TorchTrainer runs the training function in (sets the CUDA device)."""
    from ray.train.torch.config import TorchConfigContextManager
    return TorchConfigContextManager()


def torch_shutdown_timeout_s() -> float:
    """How long the process group's shutdown may take, from Ray's variable, as TorchTrainer reads it."""
    from ray.train.constants import DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S as default
    from ray.train.constants import TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S as var
    try:
        return float(os.environ.get(var, default))
    except ValueError:  # as Ray's env_integer: a malformed value falls back to the default
        return float(default)


def ray_retry_tokens() -> tuple[str, ...]:
    """The error texts for which Ray Train runs a checkpoint upload (our upload function) again."""
    from ray.train.v2._internal.constants import AWS_RETRYABLE_TOKENS
    return tuple(AWS_RETRYABLE_TOKENS)


def ray_would_retry_upload(message: str) -> bool:
    """Ray Train would run the upload function again after an error with this text: one of its
    tokens, or any "AWS Error" (tokens Ray may add later)."""
    try:
        tokens = ray_retry_tokens()
    except ImportError:
        tokens = ()
    return "AWS Error" in message or any(t in message for t in tokens)


def train_result(*, metrics: dict, checkpoint, path: str, filesystem, error=None):
    """A ``ray.train.Result`` whose checkpoint and path live on ``filesystem``."""
    import ray.train
    return ray.train.Result(metrics=metrics, checkpoint=checkpoint, error=error, path=path,
                            _storage_filesystem=filesystem)


def import_wandb_media_tempdirs() -> None:
    """Import the wandb modules that make temp dirs at import (media, artifacts), so that a caller
    which set ``tempfile.tempdir`` has them there."""
    import wandb.sdk.artifacts.artifact  # noqa: F401
    import wandb.sdk.data_types._private  # noqa: F401


def import_timm(module: str):
    """``importlib.import_module(module)`` of a timm module, without importing wandb through it:
    ``timm.utils`` imports wandb when it is installed, and wandb's import makes two temp dirs
    (media, artifacts) that only a clean interpreter exit removes. A Ray worker process is killed,
    so every decode or fine-tuning process that imported timm left them in the node's /tmp. Where
    wandb is imported already (a W&B-tracked run), the import is plain."""
    import importlib
    import sys
    if "wandb" in sys.modules:
        return importlib.import_module(module)
    sys.modules["wandb"] = None  # `import wandb` raises ImportError: timm goes on without it
    try:
        return importlib.import_module(module)
    finally:
        if sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]


# ---------------------------------------------------------------------------------------- torch

DCP_PRIVATE_PICKLE_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),  # TensorProperties.memory_format
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),        # storage_data: file, offset, length
    ("torch.serialization", "_get_layout"),                             # torch.strided (a table lookup)
})
"""The private (module, name) globals a DCP ``.metadata`` pickles, allowlisted by name."""


def dcp_fsspec_reader():
    """DCP's storage reader over an fsspec filesystem (the class; torch does not re-export it)."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
    return FsspecReader


def dcp_metadata_path(reader, rank: int | None = None):
    """The path of the ``.metadata`` a DCP ``FileSystemReader`` (or ``FsspecReader``) would read."""
    return reader._get_metadata_path(rank)


def dcp_plan_in_file_order(reader, plan):
    """A DCP ``LoadPlan`` with its items sorted by (file, offset) in ``reader``'s storage metadata."""
    import dataclasses
    info = reader.storage_data
    items = sorted(plan.items, key=lambda it: (info[it.storage_index].relative_path, info[it.storage_index].offset))
    return dataclasses.replace(plan, items=items)


def dcp_file_ranges(reader, plan) -> dict[str, list[tuple[int, int]]]:
    """The byte ranges ``plan`` reads, per file path as ``reader`` opens it: {path: [(offset, length)]}."""
    info = reader.storage_data
    out: dict[str, list[tuple[int, int]]] = {}
    for item in plan.items:
        s = info[item.storage_index]
        out.setdefault(os.fspath(reader.fs.concat_path(reader.path, s.relative_path)), []).append((s.offset, s.length))
    return out


def dcp_fsspec_of(reader):
    """The fsspec filesystem a DCP ``FsspecReader`` reads through."""
    return reader.fs.fs


@contextlib.contextmanager
def dcp_streams_from(reader, open_stream):
    """Within: ``reader``'s ``read_data`` opens each file with ``open_stream(path)`` (a context
    manager yielding a seekable binary file) instead of its filesystem's own ``create_stream``."""
    base = reader.fs

    class _Opener:
        def __getattr__(self, name):
            return getattr(base, name)

        def create_stream(self, path, mode):
            return open_stream(os.fspath(path)) if mode == "rb" else base.create_stream(path, mode)

    reader.fs = _Opener()
    try:
        yield
    finally:
        reader.fs = base


def dcp_set_element(root: dict, path, value) -> None:
    """Put ``value`` at ``path`` (a DCP object path) inside the nested state dict ``root``."""
    from torch.distributed.checkpoint._traverse import set_element
    set_element(root, path, value)
