"""mae tune: small searches of a tiny model on CPU, on the 2-node cluster with data and experiment
on the S3 server: ASHA cuts a bad trial of a learning-rate search (loss objective), the
non-finite guard ends a diverged one; a k-NN-objective Optuna search retries a trial whose driver's
node is reclaimed, and resumes after its own driver is killed without rerunning finished trials."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from support import tiny_config, tiny_overrides

# asserts on the cluster's actors or the nodes' temp dirs: alone on the cluster (tests/conftest.py)
pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow, pytest.mark.usefixtures("cluster_to_itself")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, BATCH, WORKERS = 16, 8, 2
BUDGET = STEPS * BATCH * WORKERS  # images per trial
TRIAL = [f"train.batch_size={BATCH}", f"train.max_steps={STEPS}", f"scaling.num_workers={WORKERS}",
         "data.shuffle_buffer=1024", "train.log_every=4", "train.ckpt_every=16", "train.knn_train_images=128",
         "train.knn_val_images=48", "train.min_report_interval_s=0", "run.max_failures=0"]
"""A trial's run: these over the tiny run's settings (tests/support.py)."""


@pytest.fixture(scope="module")
def tune_shards(prepared_shards, tmp_path_factory):
    from pipeline.synthetic import write_labeled_folder
    src = tmp_path_factory.mktemp("tune-labeled")
    write_labeled_folder(str(src), n_per_class=48, size=48, seed=1)  # 192 images, 4 classes
    return prepared_shards(str(src), "tune-shards", shard_size_mb=0.05, val_fraction=0.3, rows_per_row_group=8)


def test_trial_drivers_ask_for_a_stable_node():
    from jobs.core.config import load
    from jobs.tune import driver_resources
    cfg = load(None, ["data.source=s3://b/shards"])
    assert driver_resources(cfg, {"CPU": 8, "mae_stable": 1000}) == {"cpu": 0, "mae_stable": 0.001}
    assert driver_resources(cfg, {"CPU": 8}) == {"cpu": 0.01}  # no node advertises it: anywhere, said once
    pinned = load(None, ["data.source=s3://b/shards", "run.trial_driver_resources={od: 0.01}"])
    assert driver_resources(pinned, {"CPU": 8, "mae_stable": 1000}) == {"cpu": 0, "od": 0.01}


def test_concurrency_counts_gpus_and_a_trial_that_cannot_fit_is_one_line():
    from jobs.core.common import UserError
    from jobs.core.config import PretrainConfig, load
    from jobs.tune import max_concurrent, trial_resources
    gpu = load(None, ["data.source=s3://b/shards", "scaling.num_workers=4", "scaling.use_gpu=true", "scaling.cpus_per_worker=1"])
    assert trial_resources(gpu) == {"CPU": pytest.approx(0.01 + 4 + 1.01), "GPU": 4}
    assert max_concurrent(gpu, {"CPU": 128, "GPU": 8}) == 2  # the GPUs bound it, not the 128 CPUs
    assert max_concurrent(gpu, {"CPU": 6, "GPU": 8}) == 1
    with pytest.raises(UserError, match="0 GPUs"):
        max_concurrent(gpu, {"CPU": 128})
    # the hang of a 2-core machine: 2 workers x 0.5 CPU + the trial driver leave 0.99 CPU, less
    # than one decode task needs; refused in one line instead of waiting forever
    cpu = load(None, ["data.source=s3://b/shards", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5"])
    with pytest.raises(UserError, match="data.decode_cpus"):
        max_concurrent(cpu, {"CPU": 2})
    assert max_concurrent(cpu, {"CPU": 4}) == 1
    # training workers go to as few nodes as possible (intra-node collectives) unless told otherwise
    assert PretrainConfig().scaling.placement_strategy == "PACK"
    # the loss cannot rank mask ratios (a higher ratio always has a higher loss): refused in one line
    from jobs.tune import check_objective
    assert check_objective("loss", {"optim.lr": [1e-4, 1e-3]}) == "min" and check_objective("knn_top1", {}) == "max"
    with pytest.raises(UserError, match="cannot rank mask ratios"):
        check_objective("loss", {"model.overrides.mask_ratio": [0.5, 0.75]})


def test_a_driver_that_decodes_no_images_never_imports_torch(labeled_dir):
    """Loading a config and planning a run without pictures or k-NN probe (the `mae tune` driver, a
    loss-objective trial's driver) needs no torch: checking a config imported FSDP for the list of
    strategies, and the plan the optimizer module for the lr rule (2-4 s of CPU in each here)."""
    overrides = tiny_overrides(labeled_dir, None, None, short_run=False)
    code = ("import sys; from jobs.core.config import load; from jobs.core.launch import make_plan; "
            "from pipeline.sources import resolve; import jobs.core.worker, jobs.tune; "
            f"cfg = load(None, {overrides!r}); "
            "p = make_plan(cfg, resolve(cfg.data.source, 'train', 0.0, 0), 0.0); "
            "assert p.vis is None and p.probe is None and p.total_steps > 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_probe_images_cost_bytes_in_proportion_and_are_class_balanced(tune_shards, bucket, s3):
    """A trial's k-NN images come from the probe split `mae prepare` wrote: the first rows only, not
    the label column of every shard plus the image column of each shard holding a chosen row."""
    import numpy as np

    from jobs.core.launch import probe_data
    from pipeline.storage import list_files
    def probe(n_train, n_val):
        cfg = tiny_config(tune_shards, None, None, *TRIAL, "train.knn_eval=true",
                          f"train.knn_train_images={n_train}", f"train.knn_val_images={n_val}")
        mark = s3.proxy.mark()
        p = probe_data(cfg)
        return p, sum(r.received for r in s3.proxy.since(mark, f"/{bucket}/tune-shards/") if r.method == "GET")

    p, read = probe(32, 16)
    _, read_small = probe(8, 4)
    assert np.bincount(p["train_y"]).tolist() == [8, 8, 8, 8]  # 4 classes, balanced
    assert np.bincount(p["val_y"]).tolist() == [4, 4, 4, 4]
    files = [size for path, size in list_files(tune_shards) if path.endswith(".parquet") and "/probe-" not in path]
    per_image = sum(files) / 192
    # 36 more images cost about 36 images' bytes (row groups of 8 round it up), and the whole read
    # (with the manifest and the probe files' footers) is well under the dataset's bytes
    assert 0 < read - read_small < 3 * 36 * per_image, (read, read_small, per_image)
    assert read < 0.6 * sum(files), (read, sum(files))


def test_the_plan_carries_probe_and_picture_images_by_reference(tune_shards, ray_cluster):
    """The k-NN probe's images (~115 MB on ImageNet) and the picture's are put in Ray's object store
    once by the driver; the plan every worker gets in train_loop_config holds their ObjectRefs and
    no arrays."""
    import dataclasses
    import pickle

    import numpy as np
    import ray

    from jobs.core.launch import make_plan
    from jobs.core.plan import images
    from pipeline.sources import resolve
    cfg = tiny_config(tune_shards, None, None, *TRIAL, "train.knn_eval=true", "train.vis_images=2")
    plan = make_plan(cfg, resolve(cfg.data.source, "train", 0.0, 0), 0.0)
    assert isinstance(plan.probe, ray.ObjectRef) and isinstance(plan.vis, ray.ObjectRef)

    def arrays(x) -> bool:
        if isinstance(x, np.ndarray):
            return True
        if isinstance(x, dict):
            return any(arrays(v) for v in x.values())
        return isinstance(x, (list, tuple)) and any(arrays(v) for v in x)
    assert not [f.name for f in dataclasses.fields(plan) if arrays(getattr(plan, f.name))]
    probe, vis = images(plan.probe), images(plan.vis)  # what a worker gets
    assert probe["train"].shape[0] == 128 and probe["val"].shape[0] == 48 and probe["train"].dtype == np.uint8
    assert probe["train"].flags.writeable and vis["patches"].shape[0] == 2 and vis["noise"].dtype == np.float32
    shipped = len(pickle.dumps({"cfg": cfg.to_dict(), "plan": plan}))  # the Train run's train_loop_config
    assert shipped < sum(v.nbytes for v in probe.values()) / 4, shipped


# ASHA's rung cutoff is numpy's nanpercentile: when the absurd trial's NaN reaches the rung first,
# the sane trial's cutoff is taken over NaN alone (no cut: what the test expects), and numpy warns
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_search_objective_asha_cuts_the_bad_trial_and_best_config(tune_shards, bucket, mlflow_server):
    from jobs.tune import OBJECTIVE, run_tune
    from pipeline.storage import read_bytes
    # one worker per trial here (the scheduler is under test; the resume test below runs 2), and no
    # k-NN probe beside the loss (the resume test's objective is the k-NN): without it and without
    # pictures, a trial's driver reads no images and never imports torch
    base = tiny_config(tune_shards, f"s3://{bucket}/tune", None, *TRIAL, "scaling.num_workers=1",
                       f"train.batch_size={BATCH * WORKERS}",
                       "track.mlflow=true", f"track.mlflow_uri={mlflow_server}", "track.experiment=asha")
    # A learning-rate search, objective the loss (the trials share the mask ratio). Grid in order,
    # two trials at a time: a sane learning rate beside an absurd one (1000: the loss turns
    # non-finite at the first report and the guard ends the trial: its NaN is no rival at the
    # rung), then, in the absurd one's place, a huge one (5.0: the loss stays finite but ends
    # ~10^4 times the sane one's, so ASHA cuts it at its first rung whatever the images drawn; the
    # k-NN after 4 steps was a coin toss between the two: CI saw them tie). The huge trial starts
    # when the absurd one ends, a whole trial start (~20 s here) after the sane one reached that rung.
    space = {"model.overrides.mask_ratio": [0.75], "optim.lr": [0.005, 1000.0, 5.0]}
    grid, rows, tune_dir = run_tune(base, space, name="search", storage=f"s3://{bucket}/tune",
                                    max_concurrent_trials=2, restore=False, objective="loss")
    print(json.dumps(rows, indent=1))
    assert len(rows) == 3
    by_lr = {r["optim.lr"]: r for r in rows}
    r = by_lr[0.005]  # the loss at its best report; no k-NN was measured
    assert 0.0 < r["loss"] < 5.0 and r[OBJECTIVE] is None and r["images_per_s"] > 0
    # the first trial to reach each ASHA rung is never cut: it used the whole budget
    assert by_lr[0.005]["stopped_at_images"] == BUDGET
    # the huge-lr trial: finite loss (no error), cut by ASHA at its first rung (a quarter of the budget)
    huge = by_lr[5.0]
    assert huge["error"] is None and huge["stopped_at_images"] == BUDGET // 4, huge
    assert huge["loss"] > 10 * by_lr[0.005]["loss"]
    # the absurd trial: ended by the non-finite-loss guard
    absurd = by_lr[1000.0]
    assert absurd["error"] and "non-finite loss" in absurd["error"] and absurd["stopped_at_images"] < BUDGET
    # its line says how to go past it: it stopped before its first checkpoint, at its first report
    assert "optim.lr=500," in absurd["error"] and "starts again from step 0" in absurd["error"], absurd["error"]
    # each trial's checkpoint column is the URI of its run's newest complete checkpoint
    assert by_lr[0.005]["checkpoint"].endswith(f"/trials/{by_lr[0.005]['trial']}/checkpoint_{STEPS:08d}")
    # The cut trial's Train run learns of the stop at its next report (the controller finds the
    # trial's result queue gone and aborts the workers): a run this small may end and save in
    # between (seen once here, a whole suite in: checkpoint 16 written after the cut at step 4).
    # Its column is then that complete checkpoint, else nothing.
    cut = by_lr[5.0]["checkpoint"]
    assert cut is None or cut.endswith(f"/trials/{huge['trial']}/checkpoint_{STEPS:08d}"), cut
    best = grid.get_best_result(metric="loss", mode="min", scope="all")
    assert best.config["params"]["optim.lr"] == 0.005
    for f in ("results.csv", "results.md", "best_config.yaml"):
        assert read_bytes(f"{tune_dir}/{f}")
    import yaml
    best_cfg = yaml.safe_load(read_bytes(f"{tune_dir}/best_config.yaml"))
    assert best_cfg["optim"]["lr"] == best.config["params"]["optim.lr"]
    # Two trials at a time on 6 CPUs: each trial's Ray Data got its share of what the trials' workers
    # and drivers leave (not the whole cluster, which both would size themselves for)
    from jobs.tune import data_cpus_per_trial
    share = data_cpus_per_trial(base, {"CPU": 6.0}, 2)
    assert share == pytest.approx((6 - 2 * (0.01 + 1)) / 2)
    for r in rows:
        saved = yaml.safe_load(read_bytes(f"{tune_dir}/trials/{r['trial']}/config.yaml"))
        assert saved["data"]["max_data_cpus"] == pytest.approx(share), r["trial"]
    # Every trial's driver, and the Train controllers and stream coordinators that live beside
    # their drivers, ran on the node that advertises mae_stable (the head); never on the worker
    # node, which plays a spot node
    import ray
    from ray.util.state import list_actors
    stable = {n["NodeID"] for n in ray.nodes() if n["Resources"].get("mae_stable")}
    placed = {}
    for a in list_actors(limit=10000, detail=True):
        for kind in ("ImplicitFunc", "TrainController", "SplitCoordinator"):
            if a.class_name.endswith(kind):
                placed.setdefault(kind, set()).add(a.node_id)
    assert len(stable) == 1 and placed["ImplicitFunc"] and all(v <= stable for v in placed.values()), placed
    # In MLflow the search is one parent run, each trial a child run with its config as parameters
    from mlflow.tracking import MlflowClient
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("asha").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.run_name == "search search" and parent.info.status == "FINISHED"
    assert sorted(float(r.data.params["optim.lr"]) for r in children) == [0.005, 5.0, 1000.0]
    assert {r.info.run_name for r in children} == {r["trial"] for r in rows}


def test_a_killed_optuna_search_whose_trial_lost_its_driver_node_resumes(tune_shards, bucket, ray_cluster, tmp_path,
                                                                         capsys):
    """`mae tune --search optuna` (model-based TPE over the k-NN objective), one trial at a time,
    each trial's driver on a node of a spot pool.

    1. A spot reclaim of the node that hosts the first trial's driver (and so its Train controller
       and its stream's coordinator): the trial is started again on the replacement node and
       resumes its run from the run's latest complete checkpoint, neither lost nor restarted.
    2. The tune driver killed once that trial is on record as finished: started again, it resumes
       the search (Optuna's state included), keeps the finished trial as it was and runs only the rest.
    """
    import ray

    from jobs.core.checkpoint import list_checkpoints
    from jobs.tune import OBJECTIVE
    from pipeline.storage import fsspec_fs, list_files, read_bytes
    storage, steps = f"s3://{bucket}/tune-restore", 24
    pool = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "resources": {"driver_pool": 1},
            "object_store_memory": 200 * 2**20}
    victim = ray_cluster.add_node(**pool)
    ray_cluster.wait_for_nodes()
    # grace = the whole budget: ASHA cuts nothing here, so every trial must end with its final checkpoint
    args = [sys.executable, "-m", "jobs.tune",
            *tiny_overrides(tune_shards, storage, None, *TRIAL, f"train.max_steps={steps}", "train.ckpt_every=4",
                            "run.trial_driver_resources={driver_pool: 0.01}", "run.trial_retries=2"),
            "--search", "optuna", "--num-samples", "2",
            "--space", "model.overrides.mask_ratio=0.5,0.75,0.9", "--space", "model.overrides.decoder_depth=1,2",
            "--name", "resumable", "--max-concurrent", "1", "--grace-images", str(steps * BATCH * WORKERS)]
    # Tune saves its experiment state every 10 s by default; every second here, so that the first
    # trial's end is on record soon after it ends
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "TUNE_GLOBAL_CHECKPOINT_S": "1"}

    def complete(final_only=False):  # {trial: [steps of its complete checkpoints]}
        try:
            files = list_files(f"{storage}/resumable/trials")
        except Exception:  # noqa: BLE001 - nothing written yet
            return {}
        out: dict = {}
        for path, _ in files:
            if path.endswith("/COMPLETE") and "/checkpoint_" in path:
                trial, step = path.split("/trials/")[1].split("/")[0], int(path.rsplit("checkpoint_", 1)[1][:8])
                if step == steps or not final_only:
                    out.setdefault(trial, []).append(step)
        return out

    def wait_for(what, p, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline and not what() and p.poll() is None:
            time.sleep(0.5)  # each poll is an S3 listing through the counting proxy
        return what()

    log = open(tmp_path / "driver1.log", "wb")  # a file, not a pipe nobody drains until the end
    p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    replacement = None
    try:
        # 1. the reclaim, once the first trial has a complete checkpoint and before its last
        saved = wait_for(complete, p, 300)
        assert len(saved) == 1, (saved, (tmp_path / "driver1.log").read_text()[-3000:])
        (first, first_saved), = saved.items()
        assert max(first_saved) < steps, first_saved
        ray_cluster.remove_node(victim)  # the node and every process on it go
        replacement = ray_cluster.add_node(**pool)  # a new node of the same pool comes up
        # 2. the tune driver killed once the first trial's end is in its saved experiment state, and
        # a few seconds more: Ray Tune saves its trial list and its searcher's state as separate
        # files, and a kill between the two uploads left a searcher that had suggested the next
        # trial beside a trial list without it (the restored search then ended with one trial).
        # (A relaunched trial whose run is finished reports its last checkpoint's metrics without a
        # Train run: tested with the exact resume in test_pretrain.py.)
        assert list(wait_for(lambda: complete(final_only=True), p, 400)) == [first], \
            (tmp_path / "driver1.log").read_text()[-3000:]
        fs, root = fsspec_fs(storage)

        def launched_at(t):  # every launch of a trial's run writes its config.yaml
            return fs.info(f"{root}/resumable/trials/{t}/config.yaml")["LastModified"]
        first_launch = launched_at(first)

        def recorded_finished():  # trials the driver's saved experiment state has as TERMINATED
            n = 0
            for path, _ in list_files(f"{storage}/resumable"):
                if path.rsplit("/", 1)[-1].startswith("experiment_state") and path.endswith(".json"):
                    state = json.loads(read_bytes(f"s3://{path}"))
                    n = max(n, sum(json.loads(t[0]).get("status") == "TERMINATED" for t in state["trial_data"]))
            return n
        wait_for(recorded_finished, p, 60)
        time.sleep(3.0)
        os.killpg(p.pid, signal.SIGKILL)  # the driver dies in the middle of the search
        p.wait()
        log.close()
        assert recorded_finished() == 1
        # Started again with the same arguments, here in this process: `mae tune`'s main() as the CLI
        # runs it. A second interpreter would add only its own start (Ray, Tune, torch and Optuna
        # imported again, a new Ray job whose worker processes all start cold with the staged code),
        # which is not what this test is about; the killed driver above was such a process.
        from jobs.tune import main as tune_main
        capsys.readouterr()
        assert tune_main(args[3:]) == 0
        out = capsys.readouterr().out
        assert "resuming" in out, out[-3000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        log.close()
        if replacement is not None:
            ray_cluster.remove_node(replacement)
    done = complete(final_only=True)
    assert len(done) == 2 and first in done, (first, done)
    fs.invalidate_cache()
    assert launched_at(first) == first_launch  # the finished trial was not launched again
    # The first trial: one history, every step once (nothing twice after the reclaim); its retried
    # run continued after a checkpoint the lost one completed, not from step 0
    run = f"{storage}/resumable/trials/{first}"
    logged = [json.loads(x) for x in read_bytes(f"{run}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in logged] == list(range(4, steps + 1, 4))
    starts = [r["step"] for r in logged if "time/launch_to_first_log_s" in r]
    assert len(starts) == 2 and starts[0] == 4 and starts[1] > 4, starts
    assert starts[1] - 4 >= min(first_saved), (starts, first_saved)
    assert [c["step"] for c in list_checkpoints(run) if c["complete"]][-1] == steps
    import csv
    import io
    rows = list(csv.DictReader(io.StringIO(read_bytes(f"{storage}/resumable/results.csv").decode())))
    assert len(rows) == 2 and all(not row["error"] for row in rows)
    for row in rows:  # every trial drew its values from the space, ran its budget and reported the objective
        assert float(row["model.overrides.mask_ratio"]) in (0.5, 0.75, 0.9)
        assert int(row["model.overrides.decoder_depth"]) in (1, 2)
        assert 0.0 <= float(row[OBJECTIVE]) <= 1.0
        assert int(row["stopped_at_images"]) == steps * BATCH * WORKERS, row
