"""Every private Ray and torch symbol the project uses (pipeline/private_api.py), one test each:
it exists, with the signature or attributes the project relies on. A Ray or torch upgrade that
renames or drops one fails the test named after it here, in seconds and without a cluster,
instead of a run's process-group setup or resume on the cluster. No Ray is started."""

import contextlib
import importlib
import importlib.util
import inspect
import os
import re

import pytest

from pipeline import private_api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def params(fn) -> dict:
    return dict(inspect.signature(fn).parameters)


def required(fn) -> list[str]:
    return [n for n, p in params(fn).items() if p.default is p.empty and n != "self"
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


# ------------------------------------------------------------------------------------- the rule
def test_no_private_import_outside_the_adapter():
    """The project's code (not its tests) names private Ray and torch modules and symbols in
    pipeline/private_api.py only."""
    pattern = re.compile(r"\b(ray|torch|wandb)(\.\w+)*\.(_(?!_)\w+)|\b_node_ip_address\b|\b_storage_filesystem\b"
                         r"|_get_metadata_path|AWS Error|\b_StorageInfo\b|\b_MEM_FORMAT_ENCODING\b|\b_get_layout\b")
    found = []
    for top in ("jobs", "pipeline", "mae_model", "bench"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                path = os.path.join(d, f)
                if not f.endswith(".py") or path.endswith(os.path.join("pipeline", "private_api.py")):
                    continue
                with open(path) as fh:
                    for i, line in enumerate(fh, 1):
                        if pattern.search(line):
                            found.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)


# ------------------------------------------------------------------------------------- Ray
def test_ray_private_ray_constants_ENABLE_RAY_CLUSTER():
    import ray._private.ray_constants as rc
    import ray._private.services as services
    assert isinstance(rc.ENABLE_RAY_CLUSTER, bool)
    # read at node start (not only at import): setting it after `import ray` still takes effect
    assert "ray_constants.ENABLE_RAY_CLUSTER" in inspect.getsource(services)


def test_ray_init_keyword__node_ip_address():
    import ray._private.worker as worker
    src = inspect.getsource(worker.init)
    assert f'kwargs.pop("{private_api.LOCAL_NODE_IP_KW}"' in src
    assert "Unknown keyword argument" in src  # a dropped keyword fails loudly, not silently
    assert private_api.local_init_kwargs("127.0.0.1") == {"_node_ip_address": "127.0.0.1"}


def test_ray_private_utils_get_num_cpus():
    from ray._private.utils import get_num_cpus
    assert required(get_num_cpus) == []
    assert private_api.container_cpus() >= 1


def test_ray_private_state_get_max_resources_from_cluster_config():
    from ray._private.state import GlobalState, state
    assert isinstance(state, GlobalState)
    assert required(GlobalState.get_max_resources_from_cluster_config) == []


def test_ray_train_v2_internal_TrainingFramework():
    from ray.train.torch import TorchConfig
    from ray.train.v2._internal.util import TrainingFramework
    assert private_api.torch_framework() is TrainingFramework.TORCH is TorchConfig().framework
    from jobs.core.backend import ProcessGroupConfig
    assert ProcessGroupConfig().framework is TorchConfig().framework


def test_ray_train_internal_get_address_and_port():
    from ray.train._internal.utils import get_address_and_port
    assert required(get_address_and_port) == []
    src = inspect.getsource(get_address_and_port)
    assert "return" in src and "port" in src


def test_ray_train_torch_config__set_torch_distributed_env_vars():
    from ray.train.torch.config import _set_torch_distributed_env_vars
    assert required(_set_torch_distributed_env_vars) == []


def test_ray_train_torch_config__setup_torch_process_group():
    from ray.train.torch.config import _setup_torch_process_group
    assert {"backend", "world_rank", "world_size", "init_method", "timeout_s"} <= set(params(_setup_torch_process_group))
    assert set(required(_setup_torch_process_group)) <= {"backend", "world_rank", "world_size", "init_method"}


def test_ray_train_torch_config__shutdown_torch():
    from ray.train.torch.config import _shutdown_torch
    assert "destroy_process_group" in params(_shutdown_torch) and required(_shutdown_torch) == []


def test_ray_train_torch_config_TorchConfigContextManager():
    from ray.train.torch.config import TorchConfig, TorchConfigContextManager
    assert TorchConfig().train_func_context is TorchConfigContextManager  # what TorchTrainer runs in
    cm = private_api.torch_worker_context()
    assert hasattr(cm, "__enter__") and hasattr(cm, "__exit__")


def test_ray_train_constants_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S():
    from ray.train.constants import DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S
    assert isinstance(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, str)
    assert float(DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S) > 0
    assert private_api.torch_shutdown_timeout_s() > 0


def test_our_backend_takes_the_steps_of_rays_torch_backend():
    """jobs.core.backend copies _TorchBackend.on_start for init_method="env": the same steps in the
    same order. A Ray that adds or reorders a step fails here."""
    from ray.train.torch.config import _TorchBackend
    src = inspect.getsource(_TorchBackend.on_start)
    steps = ["get_address_and_port", "MASTER_ADDR", "_set_torch_distributed_env_vars", "_setup_torch_process_group"]
    at = [src.find(s) for s in steps]
    assert all(i >= 0 for i in at) and at == sorted(at), dict(zip(steps, at))
    assert "_shutdown_torch" in inspect.getsource(_TorchBackend.on_shutdown)


def test_ray_train_v2_internal_AWS_RETRYABLE_TOKENS():
    from ray.train.v2._internal.constants import AWS_RETRYABLE_TOKENS
    from ray.train.v2._internal.execution import context
    assert isinstance(AWS_RETRYABLE_TOKENS, tuple) and all(isinstance(t, str) for t in AWS_RETRYABLE_TOKENS)
    # the rule the checkpointer guards against: Ray runs the upload (our function) again on these
    assert "match=AWS_RETRYABLE_TOKENS" in inspect.getsource(context)
    assert all(private_api.ray_would_retry_upload(f"x {t} y") for t in AWS_RETRYABLE_TOKENS)
    assert not private_api.ray_would_retry_upload("checkpoint_00000006: rank 1's upload failed (OSError)")


def test_ray_train_Result_keyword__storage_filesystem():
    import ray.train
    assert "_storage_filesystem" in params(ray.train.Result)


def test_ray_private_runtime_env_packaging_loggers():
    for name in private_api.RAY_PACKAGING_LOGGERS:
        assert importlib.util.find_spec(name) is not None, name


# ------------------------------------------------------------------------------------- torch
def test_torch_dcp__fsspec_filesystem_FsspecReader(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader
    cls = private_api.dcp_fsspec_reader()
    assert issubclass(cls, FileSystemReader) and "path" in params(cls.__init__)
    reader = cls(str(tmp_path))  # a local path is an fsspec URL too
    assert hasattr(reader, "fs") and hasattr(reader.fs, "create_stream")


def test_torch_dcp_FileSystemReader__get_metadata_path_fs_load_id(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader
    assert "rank" in params(FileSystemReader._get_metadata_path)
    reader = FileSystemReader(str(tmp_path))
    assert str(private_api.dcp_metadata_path(reader)).endswith(".metadata")
    assert str(private_api.dcp_metadata_path(reader, None)) == str(tmp_path / ".metadata")
    assert hasattr(reader, "fs") and hasattr(reader, "load_id")
    assert "checkpoint_id" in params(FileSystemReader.reset)  # our reset() override passes it on


def test_torch_dcp_reader_storage_data_StorageInfo_and_read_data_streams(tmp_path):
    """SafeFsspecReader.read_data sorts the plan by (file, offset) from ``storage_data`` and has
    torch's read_data open each file through ``self.fs.create_stream`` (ours: the spans it needs)."""
    import dataclasses

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.planner import LoadPlan
    assert {"relative_path", "offset", "length"} <= {f.name for f in dataclasses.fields(_StorageInfo)}
    assert dataclasses.is_dataclass(LoadPlan) and "items" in {f.name for f in dataclasses.fields(LoadPlan)}
    assert "storage_data" in inspect.getsource(FileSystemReader.set_up_storage_reader)
    src = inspect.getsource(FileSystemReader.read_data)
    assert "self.storage_data[" in src and "self.fs.create_stream(" in src and "self.fs.concat_path(self.path" in src
    assert "for read_item in plan.items" in src  # a file's items in the plan's order: ours are sorted
    cls = private_api.dcp_fsspec_reader()
    reader = cls(str(tmp_path))
    import fsspec
    assert isinstance(private_api.dcp_fsspec_of(reader), fsspec.AbstractFileSystem)
    reader.storage_data = {"a": _StorageInfo("__1_0.distcp", 5, 3), "b": _StorageInfo("__0_0.distcp", 9, 1),
                           "c": _StorageInfo("__0_0.distcp", 0, 4)}

    class Item:
        def __init__(self, index):
            self.storage_index = index
    plan = LoadPlan([Item("a"), Item("b"), Item("c")])
    assert [i.storage_index for i in private_api.dcp_plan_in_file_order(reader, plan).items] == ["c", "b", "a"]
    ranges = private_api.dcp_file_ranges(reader, plan)
    assert ranges == {os.path.join(str(tmp_path), "__1_0.distcp"): [(5, 3)],
                      os.path.join(str(tmp_path), "__0_0.distcp"): [(9, 1), (0, 4)]}
    opened, base = [], reader.fs

    @contextlib.contextmanager
    def opener(path):
        opened.append(path)
        yield None
    with private_api.dcp_streams_from(reader, opener):
        with reader.fs.create_stream(os.path.join(str(tmp_path), "x"), "rb"):
            pass
    assert opened == [os.path.join(str(tmp_path), "x")] and reader.fs is base


def test_torch_dcp__traverse_set_element():
    from torch.distributed.checkpoint._traverse import set_element
    assert list(params(set_element)) == ["root_dict", "path", "value"]
    root = {"optim": {"param_groups": [{"lr": 0.0}]}}
    private_api.dcp_set_element(root, ("optim", "param_groups", 0, "lr"), 0.5)
    assert root["optim"]["param_groups"][0]["lr"] == 0.5


def test_torch_dcp_DefaultLoadPlanner_attributes_of_load_bytes():
    import torch
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    assert {"state_dict", "metadata", "is_coordinator"} <= set(params(DefaultLoadPlanner.set_up_planner))
    assert list(params(DefaultLoadPlanner.load_bytes))[1:] == ["read_item", "value"]
    p = DefaultLoadPlanner()
    p.set_up_planner({"model": {"w": torch.zeros(2)}, "optim": {"param_groups": [{"lr": 0.1}]}}, None, True)
    assert isinstance(p.flatten_state_dict, bool) and p.flatten_state_dict
    assert isinstance(p.mappings, dict) and isinstance(p.original_state_dict, dict) and isinstance(p.state_dict, dict)
    assert p.mappings["optim.param_groups.0.lr"] == ("optim", "param_groups", 0, "lr")


@pytest.mark.parametrize("module,name", sorted(private_api.DCP_PRIVATE_PICKLE_GLOBALS))
def test_torch_private_globals_a_dcp_metadata_pickles(module, name):
    assert hasattr(importlib.import_module(module), name)
    from jobs.core.safeload import METADATA_GLOBALS
    assert (module, name) in METADATA_GLOBALS


def test_wandb_sdk_data_types__private():
    spec = importlib.util.find_spec("wandb")  # the package's location only: wandb is not imported
    assert spec is not None and spec.submodule_search_locations
    base = os.path.join(spec.submodule_search_locations[0], "sdk", "data_types")
    assert os.path.isfile(os.path.join(base, "_private.py")) or os.path.isdir(os.path.join(base, "_private"))


# ------------------------------------------------------------------------------------- the tests' own
def test_tests_use_ray_private_node_and_parameter():
    """tests/privatenode.py starts a worker node the way ray.cluster_utils.Cluster does."""
    from ray._private.node import Node
    from ray._private.parameter import RayParams
    used = {"node_ip_address", "gcs_address", "num_cpus", "num_gpus", "resources", "object_store_memory",
            "min_worker_port", "max_worker_port", "include_log_monitor", "node_manager_port"}
    assert used <= set(params(RayParams)) and "dashboard_agent_listen_port" in params(RayParams)
    assert {"ray_params", "head", "shutdown_at_exit", "spawn_reaper"} <= set(params(Node.__init__))
    assert "allow_graceful" in params(Node.kill_all_processes)


def test_tests_use_ray_private_object_store_constants():
    import ray._private.ray_constants as rc
    for name in ("DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES", "REQUIRE_SHM_SIZE_THRESHOLD",
                 "DEFAULT_OBJECT_STORE_MEMORY_PROPORTION"):
        assert isinstance(getattr(rc, name), (int, float)), name


def test_tests_use_ray_autoscaler_private_util():
    from ray.autoscaler._private.util import prepare_config, validate_config
    assert required(prepare_config) == ["config"] and required(validate_config) == ["config"]


def test_timm_is_imported_without_wandb_so_a_killed_worker_leaves_no_temp_dirs(tmp_path):
    """The processes that import timm (decode tasks with RandAugment, fine-tuning workers with drop
    path, mixup, erasing, the soft-target loss) are Ray workers, killed rather than exited: wandb
    imported through timm left its two temp dirs in /tmp at every such process. Here a process
    builds each of them and dies as a killed worker does (os._exit): its temp dir stays empty, and
    wandb is importable afterwards (a W&B-tracked run imports it itself)."""
    import subprocess
    import sys
    code = """
import os, sys
from pipeline.transforms import auto_augment_transform
auto_augment_transform("rand-m9-mstd0.5-inc1", 32)
from mae_model.model import Block
Block(32, 2, 4.0, 1e-6, drop_path=0.1)
from pipeline.private_api import import_timm
import_timm("timm.data").Mixup, import_timm("timm.data.random_erasing").RandomErasing
import_timm("timm.loss").SoftTargetCrossEntropy()
assert "wandb" not in sys.modules
import wandb.sdk.data_types._private
print("ok", flush=True)
os._exit(0)
"""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    r = subprocess.run([sys.executable, "-c", code.replace("import wandb.sdk.data_types._private", "")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    assert not [p.name for p in scratch.iterdir() if "wandb" in p.name], list(scratch.iterdir())
    # wandb itself still imports after timm (its own temp dirs then, as a tracked run expects)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
