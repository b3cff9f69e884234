"""Distributed pretraining on the 2-node local Ray cluster, data and checkpoints on the S3 server.

Each Ray Train run takes ~20 s to its first step here, so runs are few and small.
"""

import json

import pytest

from jobs.core import checkpoint as ckpt
from jobs.core.config import load
from jobs.core.launch import fit, run_dir_of
from pipeline.prepare import PrepareConfig, prepare
from pipeline.storage import fsspec_fs, list_files, read_bytes, write_bytes

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]


@pytest.fixture(scope="module")
def shards(labeled_dir, bucket, ray_cluster):
    dst = f"s3://{bucket}/pretrain-shards"
    prepare(PrepareConfig(src=labeled_dir, dst=dst, shard_size_mb=0.05), progress=False)
    return dst


def config(shards, bucket, name, *extra):
    return load(None, [
        "model.preset=mae_vit_micro_patch4", f"data.source={shards}", "data.decode_batch_size=8", "data.rows_per_unit=16",
        "data.shuffle_buffer=32", "train.batch_size=8", "train.log_every=1", "train.vis_images=4",
        "optim.base_lr=0.02", "optim.warmup_steps=2", "optim.clip_grad=1.0",
        "scaling.num_workers=2", f"run.storage_path=s3://{bucket}/runs", f"run.name={name}",
        "run.max_failures=2", *extra])


def metrics_of(cfg):
    lines = read_bytes(f"{run_dir_of(cfg)}/metrics.jsonl").decode().splitlines()
    return [json.loads(x) for x in lines]


def test_two_workers_on_two_nodes_loss_falls_checkpoints_on_s3(shards, bucket):
    cfg = config(shards, bucket, "tiny", "train.max_steps=16", "train.ckpt_every=8")
    result, plan = fit(cfg)
    assert result.error is None
    m = metrics_of(cfg)
    losses = [r["loss"] for r in m]
    print("losses:", [round(x, 3) for x in losses])
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4  # it learns
    assert all(0 <= r["throughput/data_wait_share"] <= 1.0 + 1e-6 for r in m)
    run = run_dir_of(cfg)
    cks = ckpt.list_checkpoints(run)
    assert [c["step"] for c in cks] == [8, 16] and all(c["complete"] for c in cks)
    man = json.loads(read_bytes(f"{cks[-1]['uri']}/manifest.json"))
    assert {"__0_0.distcp", "__1_0.distcp", "dcp.metadata", "train_state.json", "config.yaml"} <= set(man["files"])
    fs, _ = fsspec_fs(run)
    for name, info in man["files"].items():  # sizes in the manifest match what landed on S3
        assert fs.size(f"{cks[-1]['uri'][5:]}/{name}") == info["size"]
    files = {p.rsplit("/", 1)[-1] for p, _ in list_files(run)}
    assert {"metrics.jsonl", "config.yaml", "reconstruction_latest.png"} <= files
    # the two workers ran on the two nodes
    from ray.util.state import list_actors
    workers = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000)]
    assert len({a.node_id for a in workers}) == 2
    # credentials never land in the saved config
    saved = read_bytes(f"{run}/config.yaml").decode()
    import os
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in saved


def test_exact_resume_matches_uninterrupted_run(shards, bucket):
    common = ["train.max_steps=8", "train.ckpt_every=4", "scaling.num_workers=1", "data.deterministic=true",
              "data.augment=true"]
    full = config(shards, bucket, "exact-full", *common)
    assert fit(full)[0].error is None
    part = config(shards, bucket, "exact-resumed", *common, "train.stop_after_steps=4")
    assert fit(part)[0].error is None
    assert ckpt.latest_complete(run_dir_of(part))["step"] == 4
    again = config(shards, bucket, "exact-resumed", *common)
    assert fit(again)[0].error is None
    a = {r["step"]: r for r in metrics_of(full)}
    b = {r["step"]: r for r in metrics_of(again)}
    assert sorted(b) == list(range(1, 9))  # continued at step 5, not from scratch
    for s in range(1, 9):
        assert b[s]["lr"] == pytest.approx(a[s]["lr"], rel=1e-12)  # the same schedule
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5), s


def test_sigkilled_worker_restarts_from_latest_checkpoint(shards, bucket):
    cfg = config(shards, bucket, "crash", "train.max_steps=8", "train.ckpt_every=3", "train.crash_at_step=5")
    result, _ = fit(cfg)
    assert result.error is None
    run = run_dir_of(cfg)
    assert read_bytes(f"{run}/crash_injected") == b"1"  # the kill happened
    m = metrics_of(cfg)
    # History is synced at checkpoints: lines after checkpoint 3 were re-logged by the restarted
    # group, which began at step 4 (its first log line carries the launch-to-first-step time).
    assert [r["step"] for r in m] == list(range(1, 9))
    restarted_at = [r["step"] for r in m if "time/launch_to_first_log_s" in r]
    assert restarted_at == [1, 4]
    assert ckpt.latest_complete(run)["step"] == 8


def test_markerless_checkpoint_ignored_and_resume_with_other_worker_count(shards, bucket):
    cfg = config(shards, bucket, "reshard", "train.max_steps=4", "train.ckpt_every=4")
    assert fit(cfg)[0].error is None
    run = run_dir_of(cfg)
    # A half-written checkpoint with a higher step: files but no COMPLETE marker.
    write_bytes(f"{run}/checkpoint_00000006/train_state.json", b'{"step": 6}')
    assert ckpt.latest_complete(run)["step"] == 4
    more = config(shards, bucket, "reshard", "train.max_steps=8", "train.ckpt_every=4", "scaling.num_workers=1")
    assert fit(more)[0].error is None
    steps = [r["step"] for r in metrics_of(more)]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # resumed at 4 (not 6), finished with 1 worker
    st = ckpt.read_train_state(ckpt.latest_complete(run)["uri"])
    assert st["step"] == 8 and st["world_size"] == 1


def test_bad_config_is_one_line(shards, bucket):
    from mae_model.config import ConfigError
    with pytest.raises(ConfigError, match="optim.base_lr"):
        config(shards, bucket, "x", "optim.base_lr=abc")
    with pytest.raises(ConfigError, match="unknown field"):
        config(shards, bucket, "x", "train.batchsize=3")
    with pytest.raises(ConfigError, match="mask_ratio"):
        config(shards, bucket, "x", "model.overrides.mask_ratio=1.5")
