"""Shared fixtures: one S3 server (behind a counting layer) and one Ray cluster (2 simulated nodes).

Both talk to 127.0.0.1 only. The S3 variables are set in the environment *before* Ray starts,
so that every Ray worker (data tasks, Train workers) reaches the same endpoint.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")        # the test head needs no token
# Without this, ray.init(address="127.0.0.1:port") "canonicalizes" the loopback address to the
# machine's outward IP; the tests must only ever talk to 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")       # no phone-home
# No Prometheus metrics export from every Ray process to its node's agent (nothing here reads them):
# measured here, the idle test cluster costs 12% of a core without it and 21% with it, and every
# run's worker processes pay it again.
os.environ.setdefault("RAY_enable_metrics_collection", "0")
# Each node's log monitor globs the logs directory for new files every 0.1 s while nothing is
# printed; with this, every 0.5 s (its own back-off once a directory holds many files). Measured
# here on the idle 2-node cluster: the two monitors cost 1.1% of a core instead of 2.7%.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # never probe 169.254.169.254
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test-speed settings of Ray Train V2 (read by its controller, which inherits this environment):
# poll the workers every 0.5 s instead of 2 s (each report and each run's end waits for a poll),
# and no preemption watcher (one actor process less per run; nothing here is preempted).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")  # Ray Train's own Prometheus gauges: not read here
# Keep idle worker processes (default: any above the node's CPU count are killed after 1 s idle):
# a decode task's worker has imported torch (~4 CPU-s); without this every run pays it again.
os.environ.setdefault("RAY_num_workers_soft_limit", "10")


@pytest.fixture(scope="session")
def s3():
    from s3server import S3Server
    server = S3Server()
    saved = {k: os.environ.get(k) for k in server.env()}
    try:  # the server goes with the session even when the setup below fails
        os.environ.update(server.env())
        from pipeline import storage
        storage._fs_s3.cache_clear()
        storage._pa_s3.cache_clear()
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def bucket(s3):
    return s3.create_bucket("mae-tests")


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """A local Ray cluster of 2 nodes on 127.0.0.1 (head + 1 worker node), shared by all tests.

    Logical CPUs are oversubscribed (2 physical cores, 6 logical): they must cover Train workers,
    Tune trial drivers and Ray Data tasks together. Two nodes are all that placement needs (a
    local path seen by one node only, workers spread over nodes); each node more costs its
    raylet, agents and idle workers (~3% of a core) and its own pool of decode workers.
    """
    import ray
    from ray.cluster_utils import Cluster

    from tmpclean import forkserver_dirs, remove_dead_forkserver_dirs
    before = forkserver_dirs()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "node_ip_address": "127.0.0.1", "dashboard_host": "127.0.0.1",
        "resources": {"node_head": 1, "mae_stable": 1000},  # the worker node plays a spot node
        "object_store_memory": 300 * 2**20})
    cluster.add_node(num_cpus=3, node_ip_address="127.0.0.1", resources={"node_worker1": 1},
                     object_store_memory=300 * 2**20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=True)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    remove_dead_forkserver_dirs(before)  # its dashboard's pymp-* dir (see there)


@pytest.fixture(scope="session")
def labeled_dir(tmp_path_factory):
    """A small learnable labeled set in ImageFolder layout (4 classes)."""
    from pipeline.synthetic import write_labeled_folder
    root = tmp_path_factory.mktemp("labeled")
    write_labeled_folder(str(root), n_per_class=24, size=48, seed=0)
    return str(root)


def scratch_dirs() -> set[str]:
    """The training attempts' scratch directories in this machine's temp dir (every simulated node's)."""
    import tempfile

    from jobs.core.common import SCRATCH_PREFIX
    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith((SCRATCH_PREFIX, "mae-ckpt-"))}


def upload_dir(local: str, s3_uri: str) -> None:
    from pipeline.storage import fsspec_fs
    fs, p = fsspec_fs(s3_uri)
    fs.put(local.rstrip("/") + "/", p, recursive=True)


def pytest_collection_modifyitems(session, config, items):
    """Modules whose tests need the shared Ray cluster run last, fewest first: the cluster starts
    with the first test that asks for it and then idles beside every later test (its raylets,
    GCS, dashboard, agents and kept workers: ~25% of a core on this 2-core machine), so the tests
    that never use it (models, transforms, FSDP over gloo, configs, the job tests' own head) go
    before it starts. A module's tests keep their order, so its fixtures are set up once."""
    def module(it):
        return it.nodeid.split("::")[0]
    uses: dict[str, list[bool]] = {}
    for it in items:
        uses.setdefault(module(it), []).append("ray_cluster" in it.fixturenames)
    share = {m: sum(u) / len(u) for m, u in uses.items()}
    items.sort(key=lambda it: share[module(it)])
