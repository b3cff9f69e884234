"""`mae preflight` on the simulated 2-node cluster (127.0.0.1): nodes and per-node placement, storage
read and written by a task on every node, token auth on the dashboard, a gloo all-reduce between
the two nodes; and the placement check `mae pretrain` runs at launch."""

import pytest
from support import upload_dir

from jobs.core.common import UserError
from jobs.core.config import load
from jobs.core.placement import FAIL, OK, WARN
from jobs.preflight import main, run_preflight
from pipeline.storage import list_files

pytestmark = [pytest.mark.ray, pytest.mark.s3]


def _cfg(source, storage, *extra):
    return load(None, ["model.preset=mae_vit_micro_patch4", f"data.source={source}", f"run.storage_path={storage}",
                       "run.name=preflight", "scaling.num_workers=2", "train.batch_size=8", *extra])


@pytest.fixture(scope="module")
def src(ray_cluster, bucket, labeled_dir):
    uri = f"s3://{bucket}/preflight-src"
    upload_dir(labeled_dir, uri)
    return uri


def test_preflight_checks_every_node_and_measures_the_all_reduce(ray_cluster, bucket, src, capsys):
    storage = f"s3://{bucket}/preflight-runs"
    rows = run_preflight(_cfg(src, storage), allreduce_mb=4, dashboard=ray_cluster.webui_url)
    by = {}
    for r in rows:
        by.setdefault(r.check, []).append(r)
    nodes = by["node"]
    assert len(nodes) == 2 and all("holds 3 workers" in r.detail for r in nodes)
    assert [r.verdict for r in by["workers"] + by["decode CPUs"]] == [OK, OK]
    # a task on each node read the source and wrote, read back and deleted a probe object
    for check in ("read data.source", "write run.storage_path"):
        assert sorted(r.where for r in by[check]) == sorted(r.where for r in nodes), check
        assert all(r.verdict == OK for r in by[check]), by[check]
    assert not [f for f in list_files(storage) if ".mae-preflight" in f]  # nothing left behind
    # the test cluster runs without token auth: said, not failed
    (auth,) = by["token auth"]
    assert auth.verdict == WARN and "without a token" in auth.detail
    # gloo between the two nodes, with a measured bandwidth
    (ar,) = by["all-reduce"]
    a, b = ar.where.split(" <-> ")
    assert ar.verdict == OK and a != b, ar
    assert float(ar.detail.split(": ")[1].split(" GB/s")[0]) > 0
    # the command: the same checks as a table, exit 0 without a FAIL
    assert main([f"data.source={src}", f"run.storage_path={storage}", "model.preset=mae_vit_micro_patch4",
                 "scaling.num_workers=2", "--no-network"]) == 0
    out = capsys.readouterr().out
    assert out.count("write run.storage_path") == 2 and "0 failed" in out


def test_preflight_fails_what_would_not_run_and_launch_refuses_it(ray_cluster, bucket, src, capsys):
    # two workers that each need the worker node's only `node_worker1`: 6 CPUs in all would do,
    # but per node only one fits
    # and a storage path no node can write (said to be a filesystem every node mounts)
    cfg = _cfg(src, "/proc/mae-preflight", "run.shared_fs=true", "scaling.resources_per_worker={node_worker1: 1}")
    rows = run_preflight(cfg, network=False)
    verdicts = {(r.check, r.verdict) for r in rows}
    assert ("workers", FAIL) in verdicts
    assert ("write run.storage_path", FAIL) in verdicts and ("read data.source", OK) in verdicts
    assert main([f"data.source={src}", "run.storage_path=/proc/mae-preflight", "run.shared_fs=true",
                 "scaling.num_workers=2", "scaling.resources_per_worker={node_worker1: 1}", "--no-network"]) == 1
    capsys.readouterr()
    from jobs.core.launch import fit
    with pytest.raises(UserError, match="1 do not fit"):
        fit(_cfg(src, f"s3://{bucket}/preflight-runs",
                 "scaling.resources_per_worker={node_worker1: 1}"))
