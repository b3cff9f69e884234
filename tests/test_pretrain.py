"""Distributed pretraining on the 2-node local Ray cluster, data and checkpoints on the S3 server.

Each Ray Train run takes ~20 s to its first step here, so runs are few and small.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import scratch_dirs
from support import Background, tiny_config, tiny_overrides

from jobs.core import checkpoint as ckpt
from jobs.core.faults import ENV as FAULTS_ENV
from jobs.core.launch import fit, run_dir_of
from pipeline.prepare import PrepareConfig, prepare
from pipeline.storage import Store, exists, fsspec_fs, list_files, read_bytes

# asserts on the cluster's actors or the nodes' temp dirs: alone on the cluster (tests/conftest.py)
pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow, pytest.mark.usefixtures("cluster_to_itself")]


@pytest.fixture(scope="module")
def shards(prepared_shards, labeled_dir):
    return prepared_shards(labeled_dir, "pretrain-shards", shard_size_mb=0.05)


def config(shards, bucket, name, *extra):
    """A tiny run of this module: 4 images in its reconstruction picture, 2 restarts on failure."""
    return tiny_config(shards, f"s3://{bucket}/runs", name, "train.vis_images=4", "run.max_failures=2", *extra)


def metrics_of(cfg):
    lines = read_bytes(f"{run_dir_of(cfg)}/metrics.jsonl").decode().splitlines()
    return [json.loads(x) for x in lines]


class ReportCounter:
    """A Ray Train callback (it runs on the controller) that appends every report it sees to a file,
    with whether the controller process has imported torch."""

    def __new__(cls, path):
        import ray.train

        class _Counter(ray.train.UserCallback):
            def __init__(self, path):
                self.path = path

            def after_report(self, run_context, metrics, checkpoint):
                import sys
                with open(self.path, "a") as f:
                    f.write(json.dumps({"step": metrics[0].get("step"), "checkpoint": checkpoint is not None,
                                        "torch": "torch" in sys.modules}) + "\n")

        return _Counter(path)


def actors(cls: str, *filters) -> dict[str, str]:
    """The cluster's actors of class ``cls`` (dead ones too, unless ``filters`` say otherwise): id -> node."""
    from ray.util.state import list_actors
    return {a.actor_id: a.node_id
            for a in list_actors(filters=[("class_name", "=", cls), *filters], limit=10000)}


def settled(left):
    """``left()``, what should be gone (actors just ended: Ray ends them asynchronously), asked
    every 0.25 s for up to 10 s until it is empty. -> its last answer."""
    for _ in range(40):
        now = left()
        if not now:
            return now
        time.sleep(0.25)
    return left()


def reports_in(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


TINY = ("train.max_steps=16", "train.ckpt_every=8", "scaling.strategy=fsdp", "train.precision=fp32",
        "scaling.placement_strategy=SPREAD",  # the default, PACK, would put both on one node
        "data.deterministic=true")  # the chaos run below ends with its weights
"""The numerics of the tiny run: 2 workers, FSDP2, fp32, 16 steps, checkpoints at 8 and 16."""


@pytest.fixture(scope="module")
def tiny(shards, bucket, tmp_path_factory):
    """The 2-worker FSDP2 run on 2 nodes (16 steps, checkpoints at 8 and 16): asserted on by the
    next test, the undisturbed run of the chaos run, and the weights the own-disk node's run
    starts from. Logged to W&B (offline: the
    test cluster's environment says WANDB_MODE=offline) and to a tracker that raises on every call."""
    cfg = config(shards, bucket, "tiny", *TINY, "track.wandb=true", "track.sync_every_s=0")  # TB synced at every log
    counter = str(tmp_path_factory.mktemp("tiny") / "reports.jsonl")
    before, earlier, controllers = scratch_dirs(), actors("RayTrainWorker"), actors("TrainController")
    sigint = signal.getsignal(signal.SIGINT)
    os.environ[FAULTS_ENV] = json.dumps({"raising_tracker": True})  # read by the driver, in fit
    try:
        result, plan = fit(cfg, callbacks=[ReportCounter(counter)])
    finally:
        del os.environ[FAULTS_ENV]
    return {"cfg": cfg, "result": result, "plan": plan, "reports": counter, "scratch_before": before,
            "workers": {a: n for a, n in actors("RayTrainWorker").items() if a not in earlier},
            "controllers": set(actors("TrainController")) - set(controllers),
            "sigint": (sigint, signal.getsignal(signal.SIGINT))}


def test_two_workers_on_two_nodes_loss_falls_checkpoints_on_s3(tiny, tmp_path):
    cfg, result, plan, counter = tiny["cfg"], tiny["result"], tiny["plan"], tiny["reports"]
    assert result.error is None
    m = metrics_of(cfg)
    losses = [r["loss"] for r in m]
    print("losses:", [round(x, 3) for x in losses])
    assert len(losses) == 16  # a log line at every step (train.log_every=1) ...
    # ... but Ray saw only the two checkpoint reports: each is a barrier of every worker; the
    # controller that saw them never imported torch (~5 CPU-s per run: it only steers the workers)
    assert reports_in(counter) == [{"step": 8, "checkpoint": True, "torch": False},
                                   {"step": 16, "checkpoint": True, "torch": False}]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4  # it learns
    assert all(0 <= r["throughput/data_wait_share"] <= 1.0 + 1e-6 for r in m)
    # the save at step 8 uploaded in the background: its time on the loop is in the next log record
    assert [r["step"] for r in m if "time/checkpoint_stall_s" in r] == [9]
    run = run_dir_of(cfg)
    cks = ckpt.list_checkpoints(run)
    assert [c["step"] for c in cks] == [8, 16] and all(c["complete"] for c in cks)
    man = json.loads(read_bytes(f"{cks[-1]['uri']}/manifest.json"))
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "train_state.json", "config.yaml"} <= set(man["files"])
    fs, _ = fsspec_fs(run)
    for name, info in man["files"].items():  # sizes in the manifest match what landed on S3
        assert fs.size(f"{cks[-1]['uri'][5:]}/{name}") == info["size"]
    # a standard DCP checkpoint: torch's own tools read the directory as it is on storage
    raw = tmp_path / "raw"
    fs.get(cks[-1]["uri"][5:] + "/", str(raw) + "/", recursive=True)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(str(raw), str(tmp_path / "full.pt"))
    import torch
    full = torch.load(str(tmp_path / "full.pt"), weights_only=True)
    assert full["model"]["cls_token"].shape[-1] == cfg.model.build().embed_dim and "optim" in full
    st = ckpt.read_train_state(cks[-1]["uri"])
    assert st["images_seen"] == 16 * plan.global_batch  # the data position, in images
    files = {p.rsplit("/", 1)[-1] for p, _ in list_files(run)}
    assert {"metrics.jsonl", "config.yaml", "reconstruction_latest.png", "checkpoints.json"} <= files
    # the two workers ran on two nodes
    ours = tiny["workers"]
    assert len(ours) == 2 and len(set(ours.values())) == 2
    # The trackers: the one that raised on every call was reported once and left alone while the
    # run went on to its end; W&B's offline run went with the run (its records hold every logged
    # loss, JSON-encoded as metrics.jsonl has them) with the pictures; TensorBoard has the scalars
    # and the reconstruction picture as an image
    state = json.loads(read_bytes(f"{run}/tracking.json"))
    assert "raising" in state["failed"] and state["wandb"]
    wandb_files = [p for p, _ in list_files(f"{run}/wandb")]
    (records,) = [p for p in wandb_files if p.endswith(f"run-{state['wandb']}.wandb")]
    data = read_bytes(f"s3://{records}")
    assert all(json.dumps(r["loss"]).encode() in data for r in m)
    assert len([p for p in wandb_files if "/media/images/reconstruction_" in p]) == 2  # steps 8 and 16
    tb_dir = tmp_path / "tb"
    fs.get(f"{run[5:]}/tb/", str(tb_dir) + "/", recursive=True)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(tb_dir), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert "reconstruction" in ev.Tags()["images"] and len(ev.Scalars("loss")) == 16
    # credentials never land in the saved config
    saved = read_bytes(f"{run}/config.yaml").decode()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in saved
    # the workers' scratch directories went with the attempt
    assert scratch_dirs() <= tiny["scratch_before"]
    # The run's pipeline counters and stream position were one actor, one process (each actor
    # costs ~2 CPU-s to start, at every launch), and it went with the run (a driver running many
    # fits kept them per run)
    from pipeline.stats import _actor_name
    from pipeline.stream import _position_name
    from ray.util.state import list_actors
    (name,) = {_actor_name(str(Store(run))), _position_name(str(Store(run)))}
    assert len(list_actors(filters=[("name", "=", name)])) == 1
    assert not list_actors(filters=[("name", "=", name), ("state", "=", "ALIVE")])
    # Ctrl-C is the driver's own again after the run (Train V2 left its handler, which aborts the
    # finished run's controller and kept that controller and its dataset actors alive) ...
    assert tiny["sigint"][1] is tiny["sigint"][0]
    # ... so the run's controller goes with the run
    assert len(tiny["controllers"]) == 1
    assert not settled(lambda: set(actors("TrainController", ("state", "=", "ALIVE"))) & tiny["controllers"])


def test_resume_and_worker_restart_continue_the_data_stream_exactly(shards, bucket, ray_cluster, monkeypatch):
    """1 worker, deterministic order: a run stopped at step 7 and started again, whose node is then
    drained for a spot reclaim in its second epoch (a checkpoint at the next log step, off the
    checkpoint cadence) and taken away (Ray Train restarts the group from that checkpoint on a
    new node), reproduces the uninterrupted run's losses: same batches, crops, masks and schedule,
    across the epoch boundary and across the restart."""
    common = ["train.max_steps=16", "train.ckpt_every=7", "scaling.num_workers=1", "data.deterministic=true",
              "data.augment=true", "train.vis_images=0"]
    # The uninterrupted run, on the stable node, beside the stopped one below (two 1-worker runs
    # share the 2 cores better than one after the other). Its driver reads the fault hook's
    # variable at launch, before it writes the run's config.yaml; the stopped run sets it after.
    full = config(shards, bucket, "exact-full", *common, "scaling.resources_per_worker={mae_stable: 1}")
    uninterrupted = Background(lambda: fit(full))
    uninterrupted.start()
    try:
        deadline = time.time() + 120
        while (not exists(f"{run_dir_of(full)}/config.yaml") and uninterrupted.thread.is_alive()
               and time.time() < deadline):
            time.sleep(0.25)
        # the started-again run's worker lives on a node of a spot pool (the numerics are the same anywhere)
        part = config(shards, bucket, "exact-resumed", *common, "scaling.resources_per_worker={spot_pool: 1}")
        victim = ray_cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"spot_pool": 1},
                                      object_store_memory=200 * 2**20)
        with monkeypatch.context() as mp:  # the test-only fault hook (jobs.core.faults), read by the driver
            mp.setenv(FAULTS_ENV, json.dumps({"stop_after_steps": 7}))
            assert fit(part)[0].error is None
        assert ckpt.latest_complete(run_dir_of(part))["step"] == 7
    finally:
        uninterrupted.thread.join()  # never left running into the next test
    result, plan = uninterrupted.result()
    assert result.error is None
    assert 16 * plan.global_batch > plan.rows  # the run crosses into a second epoch
    again = part
    with monkeypatch.context() as mp:
        # Ray Train's preemption watcher, off in the rest of the suite, on for this run (read by the
        # controller and the workers from the driver's environment); steps of ~0.5 s, so that the
        # reclaim lands mid-run
        mp.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
        mp.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")
        mp.setenv(FAULTS_ENV, json.dumps({"step_sleep_s": 0.5}))
        jit = reclaim_mid_run(ray_cluster, victim, again, resources={"spot_pool": 1})
    assert 7 < jit < 14, jit  # saved off the cadence (7, 14, 16), at the notice
    a = {r["step"]: r for r in metrics_of(full)}
    m = metrics_of(again)
    b = {r["step"]: r for r in m}
    assert sorted(b) == list(range(1, 17))
    for s in range(1, 17):
        assert b[s]["lr"] == pytest.approx(a[s]["lr"], rel=1e-12)  # the same schedule
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5), s
    # history is synced at checkpoints: the started-again run began at step 8, its restarted
    # group after the notice's checkpoint (the first log line of each attempt carries the
    # launch-to-first-step time)
    restarted_at = [r["step"] for r in m if "time/launch_to_first_log_s" in r]
    assert restarted_at == [1, 8, jit + 1]
    assert ckpt.latest_complete(run_dir_of(again))["step"] == 16
    # Started once more, the finished run trains nothing and still reports its final result (a
    # Tune trial relaunched after its driver was killed must give the scheduler its metric), read
    # from its last checkpoint: no worker group is started for it (on a cluster: every GPU of the
    # run held for minutes to report one line)
    earlier = set(actors("RayTrainWorker"))
    done, plan = fit(again)
    assert done.error is None and done.metrics["step"] == 16 and plan.finished
    assert done.metrics["loss"] == pytest.approx(b[16]["loss"], rel=1e-9)
    assert done.checkpoint.path.endswith("exact-resumed/checkpoint_00000016")
    assert set(actors("RayTrainWorker")) == earlier
    assert len(metrics_of(again)) == len(m)  # no step was run again


def final_state(run: str, tmp_path, name: str) -> dict:
    """The run's newest complete checkpoint as one torch state dict (model, optimizer, step): read
    with torch's own DCP tools from the directory as stored."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    fs, _ = fsspec_fs(run)
    raw = tmp_path / name
    fs.get(ckpt.latest_complete(run)["uri"][5:] + "/", str(raw) + "/", recursive=True)
    dcp_to_torch_save(str(raw), str(tmp_path / f"{name}.pt"))
    return torch.load(str(tmp_path / f"{name}.pt"), weights_only=True)


def unequal(a, b, at: str = "") -> list[str]:
    """The paths where the nested states ``a`` and ``b`` differ (tensors compared bit for bit)."""
    import torch
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{at}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in unequal(a[k], b[k], f"{at}/{k}")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) else [at]
    return [] if a == b else [at]


def test_a_chaos_run_ends_with_the_undisturbed_runs_weights(tiny, shards, bucket, ray_cluster, s3, monkeypatch,
                                                            tmp_path):
    """The tiny run again (2 workers, FSDP2, fp32, deterministic data) on 3 nodes, as a chaos run:
    a worker SIGKILLed at 5 random steps, 2 of them inside the upload of a checkpoint (8 and 16),
    while the bucket answers 10% of all requests with 503 SlowDown or 500. It ends with the
    undisturbed run's weights and optimizer state bit for bit (no image lost or seen twice, no
    step applied twice), with every step once in its history and the same losses, and every
    checkpoint listed complete is complete."""
    import random
    seed = int(os.environ.get("MAE_CHAOS_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    kills = [[8, "upload"], [16, "upload"]] + [[s, "step"] for s in rng.sample([*range(1, 8), *range(9, 16)], 3)]
    print(f"chaos seed {seed} (MAE_CHAOS_SEED reproduces it): kills {sorted(kills)}")
    third = ray_cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", object_store_memory=200 * 2**20)
    try:
        # each kill fails one attempt at most (two may strike the same one): room for 2 more
        chaos = config(shards, bucket, "chaos", *TINY, "run.max_failures=7")
        earlier = set(actors("RayTrainWorker"))
        mark = s3.proxy.mark()
        with monkeypatch.context() as mp:
            mp.setenv(FAULTS_ENV, json.dumps({"kills": kills}))
            try:
                s3.proxy.flaky(0.10, seed=seed)
                assert fit(chaos)[0].error is None
            finally:
                s3.proxy.clear_faults()
        nodes = {n for a, n in actors("RayTrainWorker").items() if a not in earlier}
    finally:
        ray_cluster.remove_node(third)
    reqs = s3.proxy.since(mark)
    refused = sum(r.status in (500, 503) for r in reqs)
    print(f"{refused} of {len(reqs)} requests refused; workers on {len(nodes)} nodes")
    assert refused >= 0.05 * len(reqs) and {r.method for r in reqs if r.status in (500, 503)} >= {"GET", "PUT"}
    run = run_dir_of(chaos)
    assert {p.rsplit("/", 1)[-1] for p, _ in list_files(run) if "/crash_injected_" in p} == \
        {f"crash_injected_{where}_{s}" for s, where in kills}  # every kill struck
    m, calm = metrics_of(chaos), metrics_of(tiny["cfg"])
    assert [r["step"] for r in m] == list(range(1, 17))  # every step once in its history
    assert [r["loss"] for r in m] == [r["loss"] for r in calm]
    assert unequal(final_state(run, tmp_path, "chaos"), final_state(run_dir_of(tiny["cfg"]), tmp_path, "calm")) == []
    fs, _ = fsspec_fs(run)
    listed = [c for c in ckpt.list_checkpoints(run) if c["complete"]]  # by marker, as `mae ckpt list`
    assert [c["step"] for c in listed] == [8, 16]
    indexed = {e["name"] for e in ckpt.read_index(Store(run)) if e.get("complete")}  # by the run's index
    assert indexed == {c["name"] for c in listed}
    for c in listed:  # complete: every file its manifest names is stored, at its size
        man = json.loads(read_bytes(f"{c['uri']}/manifest.json"))
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "rng_rank0.pt", "rng_rank1.pt"} <= set(man["files"])
        for name, info in man["files"].items():
            assert fs.size(f"{c['uri'][5:]}/{name}") == info["size"], (c["name"], name)


def reclaim_mid_run(cluster, victim, cfg, resources: dict) -> int:
    """Run ``fit(cfg)`` (its worker on ``victim``), drain ``victim`` for a preemption as a cloud's
    notice does through the autoscaler, wait for the checkpoint the notice makes the run save,
    take the node away and bring up another of its pool; -> the step of that checkpoint, once
    the run is done."""
    import threading

    import ray
    from ray.util.state import list_actors
    out = {}
    t = threading.Thread(target=lambda: out.update(result=fit(cfg)[0]), daemon=True)
    before = ckpt.latest_complete(run_dir_of(cfg))
    t.start()
    replacement = None
    try:
        def on_victim():
            return [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10000, detail=True)
                    if a.class_name.endswith("RayTrainWorker") and a.node_id == victim.node_id]
        deadline = time.time() + 120
        while time.time() < deadline and not on_victim():
            time.sleep(0.5)
        assert on_victim(), "the run's worker never started on the spot node"
        r = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "drain-node",
                            f"--address={ray.get_runtime_context().gcs_address}", f"--node-id={victim.node_id}",
                            "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim",
                            "--deadline-remaining-seconds=120"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        deadline = time.time() + 120
        while time.time() < deadline and ckpt.latest_complete(run_dir_of(cfg)) == before:
            time.sleep(0.25)
        jit = ckpt.latest_complete(run_dir_of(cfg))
        assert jit != before, "no checkpoint after the preemption notice"
        cluster.remove_node(victim)  # the reclaim
        replacement = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources=resources,
                                       object_store_memory=200 * 2**20)
        t.join(timeout=300)
        assert not t.is_alive() and out["result"].error is None
    finally:
        if t.is_alive():
            t.join(timeout=300)
        if replacement is not None:
            cluster.remove_node(replacement)
    return jit["step"]


def test_trainers_holding_every_cpu_are_refused_at_launch(shards, bucket):
    """The cluster has 6 CPUs; 2 workers x 3 CPUs would leave none for the decode tasks, and the
    run would wait forever with its data 'backpressured'. It is refused before anything starts."""
    from jobs.core.common import UserError
    cfg = config(shards, bucket, "starved", "train.max_steps=2", "scaling.cpus_per_worker=3")
    with pytest.raises(UserError, match="data.decode_cpus") as e:
        fit(cfg)
    assert "scaling.cpus_per_worker" in str(e.value) and "\n" not in str(e.value)


def test_local_paths_are_refused_on_a_multi_node_cluster(shards, bucket, labeled_dir, tmp_path):
    """On 2 nodes a local path is seen by one of them only: refused at launch, naming the field."""
    from pipeline.storage import StorageError
    with pytest.raises(StorageError, match=r"run.storage_path=.* local path, but the Ray cluster has 2 nodes"):
        fit(config(shards, bucket, "local", f"run.storage_path={tmp_path}/runs"))
    with pytest.raises(StorageError, match="data.source=.*run.shared_fs=true"):
        fit(config(shards, bucket, "local", f"data.source={labeled_dir}"))
    with pytest.raises(StorageError, match="SRC=.*--shared-fs"):
        prepare(PrepareConfig(src=labeled_dir, dst=f"s3://{bucket}/never"))
    assert not exists(f"s3://{bucket}/runs/local/config.yaml")  # refused before anything was written


def test_on_a_node_with_its_own_disk_local_paths_are_refused_and_s3_runs(tiny, shards, bucket, labeled_dir, tmp_path):
    """The simulated nodes above share one disk, which hides what a real cluster does to a local
    path. Here a node sees only its own disk: local paths are refused at launch; the same run on
    the S3 server trains on that node and its checkpoint is there for everyone.

    That run also starts from the 2-worker run's weights (``model.init_from`` a run directory on
    S3: its FSDP2 shards, read by rank 0), and decodes on the worker's device (``data.decode=gpu``,
    here the CPU: the same patches within rounding): it begins where that run ended, not at a
    random init's loss."""
    import ray
    from privatenode import PrivateNode
    from pipeline.storage import StorageError
    basetemp = os.path.commonpath([labeled_dir, str(tmp_path)])  # every test's temp dirs
    node = PrivateNode(ray.get_runtime_context().gcs_address, hidden=[basetemp], resource="own_disk")
    try:
        sees = ray.remote(num_cpus=0, resources={"own_disk": 1})(os.path.isdir)
        assert os.path.isdir(labeled_dir) and ray.get(sees.remote(labeled_dir)) is False  # another machine's view
        on_node = ["scaling.num_workers=1", "scaling.resources_per_worker={own_disk: 1}", "train.max_steps=2",
                   "train.ckpt_every=2"]
        with pytest.raises(StorageError, match="run.storage_path=.*local path"):
            fit(config(shards, bucket, "own-disk-local", *on_node, f"run.storage_path={tmp_path}/runs"))
        before = set(actors("RayTrainWorker"))
        cfg = config(shards, bucket, "own-disk-s3", *on_node, "optim.base_lr=1e-9", "data.decode=gpu",
                     f"model.init_from={run_dir_of(tiny['cfg'])}")
        fit(cfg)
        assert ckpt.latest_complete(run_dir_of(cfg))["step"] == 2
        losses = [r["loss"] for r in metrics_of(tiny["cfg"])]
        first = metrics_of(cfg)[0]["loss"]
        assert abs(first - losses[-1]) < 0.25 * losses[-1] and first < 0.8 * losses[0], (first, losses)
        ran_on = {n for a, n in actors("RayTrainWorker").items() if a not in before}
        assert ran_on == {node.node_id}
    finally:
        node.stop()


def alive_run_actors() -> list[str]:
    """The names of this driver's run actors (pipeline.runactor) still alive, once those just
    released have gone (ray.kill is asynchronous)."""
    import ray
    from ray.util.state import list_actors

    from pipeline.runactor import RUN_ACTOR
    job = ray.get_runtime_context().get_job_id()

    return settled(lambda: [a.name for a in list_actors(filters=[("job_id", "=", job), ("state", "=", "ALIVE")],
                                                           limit=10000) if (a.name or "").startswith(RUN_ACTOR)])


def test_the_papers_linear_probe_on_the_runs_checkpoint(tiny, labeled_dir):
    """`mae evaluate --linear-protocol mae` on the 2-worker run's checkpoint: the paper's probe as a
    Ray Train job on 2 workers (`mae finetune --linprobe`: frozen encoder, BatchNorm + Linear head,
    LARS, global batch split over the workers), scored on the val images every epoch; final and best
    epoch reported. Here on the small labeled folder (a fifth held out as val)."""
    from jobs.evaluate import evaluate
    paper = evaluate(run_dir_of(tiny["cfg"]), labeled_dir, workers=1, linear_protocol="mae", linear_epochs=2,
                     linear_warmup_epochs=1, linear_batch=16, write=True,
                     shared_fs=True)  # the simulated nodes share one disk
    assert paper["linear_protocol"] == "mae" and "linear_top1/cls" not in paper
    # Every run's actor this driver started went with its run: the probe's validation set has one of
    # its own (pipeline.runactor), which outlived every fine-tuning and probe run (a process and ~1%
    # of a core each, on a cluster that runs many)
    assert not alive_run_actors()
    assert paper["random_init"] is False and paper["classes"] == 4
    assert 0.0 <= paper["linear_mae_top1/cls"] <= paper["linear_mae_best_top1/cls"] <= 1.0
    assert 0.0 <= paper["knn_top1/cls"] <= 1.0
    # 2 epochs of train_images // 16 steps (global batch 16 = 8 x 2 workers) at lr 0.1 x 16 / 256,
    # scored after each epoch on every val image
    n = paper["train_images"]
    assert n + paper["val_images"] == 96 and n > 32
    lp = paper["linear_mae"]
    assert lp["steps"] == 2 * (n // 16) and lp["lr"] == pytest.approx(0.1 * 16 / 256) and lp["evaluations"] == 2
    cfg = yaml.safe_load(read_bytes(f"{lp['run']}/config.yaml"))
    assert cfg["finetune"]["linprobe"] and cfg["train"]["batch_size"] == 8 and cfg["scaling"]["num_workers"] == 2
    # the table went to the run's own W&B run too (offline here), beside its training curves
    run = run_dir_of(tiny["cfg"])
    tables = [p for p, _ in list_files(f"{run}/wandb") if "/media/table/evaluation" in p and p.endswith(".table.json")]
    assert len(tables) == 1, tables
    table = json.loads(read_bytes(f"s3://{tables[0]}"))
    assert "knn_top1/cls" in table["columns"] and len(table["data"]) == 1


def test_a_failed_run_is_one_line_and_exit_1(shards, bucket, capsys):
    """Train V2's fit() raises when the workers fail: the user sees the worker's own error in one
    line (here: rank 0 cannot read model.init_from), not the chain of tracebacks."""
    from jobs.pretrain import main
    missing = f"s3://{bucket}/no/such/encoder.pth"
    with pytest.raises(SystemExit) as e:
        main(tiny_overrides(shards, f"s3://{bucket}/runs", "fails", "train.max_steps=2", "train.vis_images=8",
                            "scaling.num_workers=1", "run.max_failures=0", f"model.init_from={missing}",
                            short_run=False))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1
    assert err[-1].startswith("mae pretrain: error: the run failed: rank 0: ") and "no/such/encoder.pth" in err[-1], err


def test_bad_config_is_one_line(shards, bucket):
    from mae_model.config import ConfigError
    with pytest.raises(ConfigError, match="optim.base_lr"):
        config(shards, bucket, "x", "optim.base_lr=abc")
    with pytest.raises(ConfigError, match="unknown field"):
        config(shards, bucket, "x", "train.batchsize=3")
    with pytest.raises(ConfigError, match="mask_ratio"):
        config(shards, bucket, "x", "model.overrides.mask_ratio=1.5")
