"""What a long cluster run sees, in small: many small shards on S3, 2 simulated nodes, a checkpoint
at every step, a worker SIGKILLed mid-run, a resume with another worker count, and every storage
request counted by the layer in front of the S3 server (tests/s3proxy.py).

The rule under test (docs/design.md, "Rules of scale"): the storage cost of a checkpoint is the same
for the 2nd and the 10th, because nothing on the save path lists or re-reads what earlier saves
wrote."""

import json
from collections import Counter

import pytest
from conftest import scratch_dirs
from support import tiny_config

from jobs.core import checkpoint as ckpt
from jobs.core.faults import ENV as FAULTS_ENV
from jobs.core.launch import fit, run_dir_of
from jobs.core.optim import lr_at
from pipeline.sources import read_manifest
from pipeline.storage import read_bytes, write_bytes

# asserts on the cluster's actors or the nodes' temp dirs: alone on the cluster (tests/conftest.py)
pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow, pytest.mark.usefixtures("cluster_to_itself")]

RAY_OWN = ("checkpoint_manager_snapshot.json", ".validate_storage_marker")  # Ray Train's files, not ours


def _ckpt_step(path: str, run_key: str) -> int | None:
    rest = path[len(run_key):].lstrip("/")
    head = rest.split("/", 1)[0]
    return int(head.split("_")[1]) if head.startswith("checkpoint_") else None


def per_checkpoint_requests(reqs, bucket: str, run_key: str) -> dict[int, Counter]:
    """Requests to the run directory grouped by the save they belong to: a save starts with the
    first file of its checkpoint directory and runs until the next save's start (its shards, the
    metrics log, manifest, marker, index, pruning; and the next save's removal of a stale marker,
    which precedes that save's first file). Saves do not overlap in storage: an upload runs in the
    background while training goes on, but every rank waits for the previous save to be complete
    before it starts the next."""
    prefix = f"/{bucket}/{run_key}"
    mine = []
    for r in reqs:
        in_run = r.path.startswith(prefix + "/") or (r.path == f"/{bucket}" and f"prefix={run_key}" in
                                                       r.query.replace("%2F", "/"))
        bulk_delete = r.path == f"/{bucket}" and r.query.startswith("delete")
        # TensorBoard's files are synced from a thread of their own at log cadence (not part of a
        # save), and the reconstruction pictures at picture steps: neither is a checkpoint's cost
        log_files = "/tb/" in r.path or "/pictures/" in r.path or r.path.endswith("/reconstruction_latest.png")
        # Each rank's upload first puts the run directory's own marker (an idempotent mkdir); which
        # save it falls in by time depends on which rank's upload starts first: left out
        run_marker = r.path == prefix + "/"
        if (in_run or bulk_delete) and not r.path.endswith(RAY_OWN) and not log_files and not run_marker:
            mine.append(r)
    starts: dict[int, float] = {}
    for r in mine:
        k = _ckpt_step(r.path, f"/{bucket}/{run_key}")
        if k is not None and r.method == "PUT":
            starts.setdefault(k, r.t)
    order = sorted(starts.items(), key=lambda kv: kv[1])
    out: dict[int, Counter] = {k: Counter() for k in starts}
    for r in mine:
        owner = None
        for k, t in order:
            if t <= r.t:
                owner = k
        if owner is not None:
            kind = r.method + (" list" if "list-type" in r.query else " bulk-delete" if r.query.startswith("delete")
                               else "")
            out[owner][kind] += 1
    return out


def dcp_bytes(reqs, prefix: str) -> dict:
    """Bytes of a checkpoint's DCP files (shards, .metadata) under ``prefix``: written (PUT bodies) and
    read back (GET bodies)."""
    dcp = [r for r in reqs if r.path.startswith(prefix) and (r.path.endswith(".distcp") or r.path.endswith("/.metadata"))]
    return {"written": sum(r.sent for r in dcp if r.method == "PUT"),
            "read": sum(r.received for r in dcp if r.method == "GET")}


def test_long_run_checkpoint_cost_constant_kill_and_resize(s3, bucket, prepared_shards, labeled_dir, monkeypatch,
                                                           mlflow_server):
    shards = prepared_shards(labeled_dir, "many-shards", shard_size_mb=0.005, val_fraction=0.0)
    m = read_manifest(shards)
    assert len(m["splits"]["train"]["files"]) >= 20  # many small shards (ImageNet has ~1,000)
    common = ["data.rows_per_unit=8", "data.shuffle_buffer=16", "train.ckpt_every=1", "train.keep_last=1",
              "train.best_metric=", "run.max_failures=2"]
    # logged to a real MLflow server too, with two reconstruction pictures
    tracked = ["track.mlflow=true", f"track.mlflow_uri={mlflow_server}", "track.experiment=long-run",
               "train.vis_images=2", "train.vis_every=6"]
    cfg = tiny_config(shards, f"s3://{bucket}/runs", "long", *common, "train.max_steps=12", "scaling.num_workers=2",
                      "scaling.strategy=fsdp", *tracked)
    mark = s3.proxy.mark()
    before = scratch_dirs()
    with monkeypatch.context() as mp:  # the test-only fault hook (jobs.core.faults), read by the driver
        mp.setenv(FAULTS_ENV, json.dumps({"crash_at_step": 6, "crash_in_upload": True}))
        result, plan = fit(cfg)
    assert result.error is None
    run = run_dir_of(cfg)
    assert read_bytes(f"{run}/crash_injected") == b"1"  # rank 1 was killed uploading checkpoint 6 ...
    recs = [json.loads(x) for x in read_bytes(f"{run}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 13))
    # ... in the background, while training went on: that checkpoint never got its marker, so the
    # restarted group went on from checkpoint 5 (its first log line is step 6), and what the dead
    # attempt logged after step 5 is not in the history twice
    assert [r["step"] for r in recs if "time/launch_to_first_log_s" in r] == [1, 6]
    # the killed attempt could not remove its scratch directory (its checkpoint staging): the
    # restarted group did, so nothing of the run is left on the nodes' disks
    assert scratch_dirs() <= before, scratch_dirs() - before
    # One MLflow run holds both attempts: its params, every step once (the restarted attempt did
    # not log again what the killed one had logged), the pictures, the last checkpoint's URI
    from mlflow.tracking import MlflowClient
    client = MlflowClient(mlflow_server)
    (mrun,) = client.search_runs([client.get_experiment_by_name("long-run").experiment_id])
    assert json.loads(read_bytes(f"{run}/tracking.json"))["mlflow"] == mrun.info.run_id
    assert mrun.data.params["model.preset"] == "mae_vit_micro_patch4" and mrun.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "loss")] == list(range(1, 13))
    assert {"lr", "throughput/images_per_s", "memory/peak_mb"} <= set(mrun.data.metrics)
    pictures = [a.path for a in client.list_artifacts(mrun.info.run_id, "pictures")]
    assert pictures == ["pictures/reconstruction_00000006.png", "pictures/reconstruction_00000012.png"], pictures
    assert mrun.data.tags["checkpoint_latest"].endswith("/runs/long/checkpoint_00000012")

    # The restarted group resumed from checkpoint 5, FSDP2 on 2 ranks: each rank read only the
    # byte ranges of its shards (and the .metadata), so the checkpoint was read about once in all
    dcp = dcp_bytes(s3.proxy.since(mark), f"/{bucket}/runs/long/{ckpt.ckpt_name(5)}/")
    print("checkpoint 5 (FSDP2, 2 ranks): written", dcp["written"], "B, read to resume", dcp["read"], "B")
    assert 0.9 * dcp["written"] <= dcp["read"] <= 1.3 * dcp["written"], dcp

    counts = per_checkpoint_requests(s3.proxy.since(mark), bucket, "runs/long")
    for k in sorted(counts):
        print(k, dict(counts[k]))
    assert sum(counts[2].values()) > 0
    assert counts[2] == counts[10], (counts[2], counts[10])  # the 2nd save costs what the 10th does
    # only the newest checkpoint is kept (keep_last=1, no best metric); the others left a note
    kept = [c for c in ckpt.list_checkpoints(run) if c["complete"]]
    assert [c["step"] for c in kept] == [12]
    index = json.loads(read_bytes(f"{run}/checkpoints.json"))
    assert [e["step"] for e in index] == [12]

    # a half-written checkpoint with a higher step (files, no COMPLETE marker) is never resumed from
    write_bytes(f"{run}/checkpoint_00000099/train_state.json", b'{"step": 99}')
    assert ckpt.read_train_state(kept[0]["uri"])["strategy"] == "fsdp"
    # resume with another worker count and strategy (one worker: auto replicates, i.e. a plain
    # model, reading FSDP2's shards): the same global batch by accumulation, so the schedule and
    # the images seen go on as if nothing had changed
    more = tiny_config(shards, f"s3://{bucket}/runs", "long", *common, "train.max_steps=14", "scaling.num_workers=1")
    written = dcp_bytes(s3.proxy.since(mark), f"/{bucket}/runs/long/{ckpt.ckpt_name(12)}/")["written"]
    mark = s3.proxy.mark()
    result, plan = fit(more)
    assert result.error is None and plan.accum_steps == 2 and plan.global_batch == 16
    read = dcp_bytes(s3.proxy.since(mark), f"/{bucket}/runs/long/{ckpt.ckpt_name(12)}/")["read"]
    assert 0.9 * written <= read <= 1.1 * written, (read, written)  # the one rank read it once
    m = [json.loads(x) for x in read_bytes(f"{run}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in m] == list(range(1, 15))  # went on at 13 (not 100), with 1 worker
    peak = 0.02 * 16 / 256
    for r in m:
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, peak=peak, warmup=2, total=14 if r["step"] > 12 else 12),
                                        rel=1e-9)
        assert r["images_seen"] == 16 * r["step"]
    assert abs(m[12]["loss"] - m[11]["loss"]) < 0.3 * m[11]["loss"]  # no jump at the resume
    st = ckpt.read_train_state(ckpt.latest_complete(run)["uri"])
    assert st["step"] == 14 and st["images_seen"] == 14 * 16 and st["world_size"] == 1 and st["accum_steps"] == 2
    assert st["strategy"] == "ddp"
    # a global batch the new worker count cannot make is refused in one line
    from jobs.core.common import UserError
    odd = tiny_config(shards, f"s3://{bucket}/runs", "long", *common, "train.max_steps=16", "train.batch_size=3",
                      "scaling.num_workers=1")
    with pytest.raises(UserError, match="global batch 16 is not a multiple of 3"):
        fit(odd)
