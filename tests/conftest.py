"""Shared fixtures: one S3 server (behind a counting layer), one Ray cluster (2 simulated nodes),
and shards prepared on them once per session.

Both talk to 127.0.0.1 only. The S3 variables are set in the environment *before* Ray starts,
so that every Ray worker (data tasks, Train workers) reaches the same endpoint.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from support import apply_ray_env  # noqa: E402

apply_ray_env()


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
def digits_runs(ray_cluster, bucket, tmp_path_factory):
    """The digits runs (tests/digits_runs.py), started on the shared cluster; killed at the session's
    end if still running."""
    import ray

    from digits_runs import DigitsRuns
    runs = DigitsRuns(ray.get_runtime_context().gcs_address, bucket, str(tmp_path_factory.mktemp("digits-runs")))
    runs.start()
    yield runs
    runs.stop()


_started: list = []


@pytest.fixture(scope="session", autouse=True)
def _long_runs_first(request):
    """When a collected test uses the digits runs, they start with the session's first test (and with
    them the S3 server and the shared cluster), so that they run beside the tests that use no Ray."""
    if any("digits_runs" in it.fixturenames for it in request.session.items):
        _started.append(request.getfixturevalue("digits_runs"))


@pytest.fixture(scope="session")
def cluster_to_itself():
    """For a test that asserts on the cluster's actors, or on what is in the nodes' temp dir: the
    digits runs, where this session started them, are over first (their tests, which wait for them,
    come earlier in the suite's order: then this waits for nothing). Session-scoped, so that it comes
    before a module's fixtures."""
    for runs in _started:
        runs.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (a local SQLite store and artifact folder), for
    the tests that log runs to it; stopped by its own process group at the end.

    Tracking only: without ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` the server also starts its
    job runner, one Huey consumer process per kind of server-side job and one for periodic tasks
    (8 processes polling their queues: ~40 CPU-s over the suite), none of which the runs use."""
    import signal
    import subprocess
    import time
    import urllib.request

    from s3server import free_port
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "wb")
    p = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
                          "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                          "--artifacts-destination", str(root / "artifacts")],
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
                         env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if p.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the MLflow server did not start: " + (root / "server.log").read_text()[-2000:])
                time.sleep(0.5)
        yield uri
    finally:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(p.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="session")
def labeled_dir(tmp_path_factory):
    """A small learnable labeled set in ImageFolder layout (4 classes)."""
    from pipeline.synthetic import write_labeled_folder
    root = tmp_path_factory.mktemp("labeled")
    write_labeled_folder(str(root), n_per_class=24, size=48, seed=0)
    return str(root)


@pytest.fixture(scope="session")
def prepared_shards(bucket, ray_cluster):
    """A factory: ``prepared_shards(src, name, **prepare_kwargs)`` runs ``mae prepare`` of the image
    folder ``src`` to ``s3://<bucket>/<name>`` on the shared cluster and returns that URI, once per
    session for the same arguments. ``prepare_kwargs`` are ``PrepareConfig`` fields; ``shared_fs``
    is true unless given (the simulated nodes share one disk, so a local ``src`` is seen by all).
    A name already prepared from other arguments is refused: its shards are not these."""
    from pipeline.prepare import PrepareConfig, prepare
    done: dict[str, tuple] = {}

    def make(src: str, name: str, **prepare_kwargs) -> str:
        kwargs = {"shared_fs": True, **prepare_kwargs}
        key = (str(src), tuple(sorted(kwargs.items())))
        dst = f"s3://{bucket}/{name}"
        if name in done:
            if done[name] != key:
                raise ValueError(f"prepared_shards: {dst} was prepared from {done[name]}, not {key}")
            return dst
        prepare(PrepareConfig(src=str(src), dst=dst, **kwargs), progress=False)
        done[name] = key
        return dst

    return make


def scratch_dirs() -> set[str]:
    """The training attempts' scratch directories in this machine's temp dir (every simulated node's)."""
    import tempfile

    from jobs.core.common import SCRATCH_PREFIX
    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith((SCRATCH_PREFIX, "mae-ckpt-"))}


def pytest_collection_modifyitems(session, config, items):
    """Modules whose tests need the shared Ray cluster run last, fewest first: the cluster starts
    with the first test that asks for it and then idles beside every later test (its raylets,
    GCS, dashboard, agents and kept workers: ~25% of a core on this 2-core machine), so the tests
    that never use it (models, transforms, FSDP over gloo, configs, the job tests' own head) go
    before it starts (unless the digits runs start it with the session: they keep it busy). A
    module's tests keep their order, so its fixtures are set up once."""
    def module(it):
        return it.nodeid.split("::")[0]
    uses: dict[str, list[bool]] = {}
    for it in items:
        uses.setdefault(module(it), []).append("ray_cluster" in it.fixturenames)
    share = {m: sum(u) / len(u) for m, u in uses.items()}
    items.sort(key=lambda it: share[module(it)])
