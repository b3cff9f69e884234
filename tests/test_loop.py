"""The loop's parts that need no Ray: the cadence, the test-only fault hook, the typed plan, the
first batch fetched in the background."""

import dataclasses
import itertools
import json
import pickle

import pytest

from jobs.core.config import ConfigError, describe, load
from jobs.core.faults import ENV, Faults
from jobs.core.schedule import Cadence


def inline_flags(step, *, total, start, stop_after, log_every, report_every, ckpt_every, vis_every):
    """The flags as the loop worked them out inline before the cadence had a type of its own."""
    last = step == total
    stop = stop_after > 0 and step - start >= stop_after
    is_ckpt = step % ckpt_every == 0 or last or stop
    is_report = report_every > 0 and step % report_every == 0 and not is_ckpt
    is_log = step % log_every == 0 or is_ckpt or is_report
    picture = is_log and (step % (vis_every or ckpt_every) == 0 or last or stop)
    return is_log, is_report, is_ckpt, picture, last or stop


@pytest.mark.parametrize("log_every,report_every,ckpt_every,vis_every,start,stop_after",
                         list(itertools.product([1, 3], [0, 2, 5], [4, 7], [0, 3], [0, 5], [-1, 6])))
def test_cadence_gives_the_loops_flags(log_every, report_every, ckpt_every, vis_every, start, stop_after):
    train = load(None, ["data.source=/x", f"train.log_every={log_every}", f"train.report_every={report_every}",
                        f"train.ckpt_every={ckpt_every}", f"train.vis_every={vis_every}"]).train
    total = 23
    c = Cadence.of(train, total, start=start, stop_after=stop_after)
    for step in range(start + 1, total + 1):
        at = c.at(step)
        want = inline_flags(step, total=total, start=start, stop_after=stop_after, log_every=log_every,
                            report_every=report_every, ckpt_every=ckpt_every, vis_every=vis_every)
        assert (at.log, at.report, at.checkpoint, at.picture, at.stop) == want, step
        if at.stop:
            break


def test_fault_injection_is_not_a_user_setting(monkeypatch):
    help_text = describe()
    for name in ("crash_at_step", "crash_in_upload", "stop_after_steps"):
        assert name not in help_text
        with pytest.raises(ConfigError, match=name):
            load(None, ["data.source=/x", f"train.{name}=1"])
    monkeypatch.delenv(ENV, raising=False)
    assert Faults.from_env() is None
    monkeypatch.setenv(ENV, json.dumps({"crash_at_step": 6, "crash_in_upload": True}))
    f = Faults.from_env()
    assert f.crash_in_upload_of(6) and not f.crash_in_upload_of(5) and f.step_sleep_s == 0
    monkeypatch.setenv(ENV, json.dumps({"crash_at": 6}))
    with pytest.raises(ValueError, match="crash_at"):
        Faults.from_env()


def test_the_plan_is_typed_and_frozen():
    from jobs.core.plan import RunPlan
    from pipeline.stream import Stream
    plan = RunPlan(run_dir="s3://b/runs/x", global_batch=16, accum_steps=1, steps_per_epoch=4, total_steps=8,
                   warmup_steps=2, peak_lr=1e-3, precision="fp32", flops_per_image=1.0, rows=64, t_launch=0.0,
                   config_yaml="", finished=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.total_steps = 9
    planned = plan.with_stream(Stream((8, 8), 0, True), None)
    assert planned.stream.rows_per_epoch == 16 and plan.stream is None
    assert pickle.loads(pickle.dumps(planned)) == planned  # it travels in train_loop_config


def test_a_tracker_turned_on_but_missing_or_unreachable_is_one_line_at_launch(monkeypatch):
    import socket
    import sys

    from jobs.core.common import UserError
    from jobs.core.tracking import check_trackers
    track = load(None, ["data.source=/x", "track.mlflow=true"]).track
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI"):
        check_trackers(track)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    track.mlflow_uri = f"http://127.0.0.1:{port}"
    with pytest.raises(UserError, match="does not answer"):
        check_trackers(track)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install 'ray-mae\[mlflow\]'"):
        check_trackers(track)
    wb = load(None, ["data.source=/x", "track.wandb=true"]).track
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(UserError, match="WANDB_API_KEY"):
        check_trackers(wb)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match=r"pip install 'ray-mae\[wandb\]'"):
        check_trackers(wb)


def test_a_tracker_that_raises_is_reported_once_and_never_holds_the_caller(tmp_path, capsys):
    """The training thread only queues; a failing tracker is switched off after one warning line
    and named in the run's tracking.json."""
    import threading

    from jobs.core.faults import RaisingTracker
    from jobs.core.tracking import Tracking
    from pipeline.storage import Store
    release = threading.Event()

    class Slow:
        name = "slow"
        calls = 0

        def __getattr__(self, method):
            def call(*args):
                release.wait(30)  # a tracker stuck on the network
                Slow.calls += 1
            return call

    cfg = load(None, ["data.source=/x"])
    t = Tracking(cfg, Store(str(tmp_path / "run")), run_name="r", local_dir=str(tmp_path), extra=[RaisingTracker(), Slow()])
    t.start({"a": 1})
    for step in range(1, 50):
        t.metrics(step, {"loss": 1.0 / step})  # returns at once while the tracker thread is stuck
    assert Slow.calls == 0
    release.set()
    t.close(True)
    out = capsys.readouterr().out
    assert out.count("tracker raising failed") == 1, out
    assert Slow.calls == 1 + 49 + 1  # start, every step, close
    state = json.loads((tmp_path / "run" / "tracking.json").read_text())
    assert "raising" in state["failed"]


def test_a_non_finite_loss_names_its_step_and_how_to_go_past_it():
    """The official code stops at a non-finite loss with "Loss is nan, stopping training"; ours also
    says where (the first bad step), what a relaunch resumes from, and a change to make."""
    from jobs.core.trainer import nonfinite_message
    optim = load(None, ["data.source=/x", "optim.base_lr=1e-3"]).optim
    line = nonfinite_message(37, float("nan"), 2.5e-4, optim, last_step=30, peak=1e-3)
    assert "\n" not in line and "at step 37" in line and "loss nan" in line
    assert "resumes from checkpoint_00000030 (step 30)" in line and "optim.base_lr=0.0005" in line
    assert "same run.name and run.storage_path" in line
    absolute = load(None, ["data.source=/x", "optim.lr=0.02"]).optim
    line = nonfinite_message(3, float("inf"), 0.02, absolute, last_step=0, peak=0.02)
    assert "starts again from step 0" in line and "optim.lr=0.01" in line
    from jobs.core.finetune_config import FinetuneOptim
    recipe = FinetuneOptim()  # base_lr -1: the recipe's (filled in when the config is validated)
    assert recipe.base_lr < 0 and "optim.lr=0.0004" in nonfinite_message(9, float("nan"), 8e-4, recipe, 0, peak=8e-4)


def test_the_first_batch_is_fetched_in_the_background_and_the_rest_on_the_callers_thread():
    """The trainer opens its data stream before it builds the model and loads the checkpoint:
    the first batch is fetched on a thread of its own meanwhile; the rest, and the end, come as
    from the stream itself, and an error of the first fetch is raised by the first ``next()``."""
    import threading

    from jobs.core.trainer import Prefetched
    threads: list[str] = []
    started = threading.Event()

    def stream(n):
        for i in range(n):
            threads.append(threading.current_thread().name)
            started.set()
            yield i
    it = Prefetched(stream(3))
    assert started.wait(10)  # fetched before anyone asked for it
    assert list(it) == [0, 1, 2] and next(it, None) is None
    assert threads[0] == "mae-first-batch" and set(threads[1:]) == {threading.current_thread().name}
    assert next(Prefetched(stream(0)), None) is None  # an empty stream ends at once

    def failing():
        raise OSError("the shard's read failed")
        yield
    broken = Prefetched(failing())
    with pytest.raises(OSError, match="shard's read failed"):
        next(broken)
