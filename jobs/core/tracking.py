"""Experiment trackers where users already look: MLflow and Weights & Biases, beside TensorBoard.

Rank 0 logs through one :class:`Tracking`: every call is put on a queue that one background
thread works off, so a slow or unreachable tracker never stalls a training step; a tracker whose
call raises is reported in one warning line and left alone for the rest of the attempt.

A run keeps one tracker run for its whole life: the ids go to ``<run>/tracking.json`` at the
first start, and a resumed attempt (a restarted worker group, the same command again) continues
that run. Steps a dead attempt logged past the checkpoint its successor resumed from are not
logged twice: each tracker skips steps at or below the last one it holds.

What is logged: the resolved config (parameters) at the start, the metrics of every log step,
the reconstruction picture at every picture step, the checkpoint URIs (references, never the
weights) and evaluation tables. Credentials come from the trackers' own environment variables
(``MLFLOW_TRACKING_TOKEN``, ``WANDB_API_KEY``, ...) and are never logged or saved.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import urllib.error
import urllib.request

import numpy as np

from jobs.core.common import UserError, say

STATE_FILE = "tracking.json"


def mlflow_uri(track) -> str:
    return track.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", "")


def check_trackers(track) -> None:
    """At launch, on the driver, before any worker holds a GPU: every tracker turned on is
    installed and reachable, else one line naming the fix."""
    if track.mlflow:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise UserError("track.mlflow=true needs the mlflow package: pip install 'ray-mae[mlflow]'") from None
        uri = mlflow_uri(track)
        if not uri:
            raise UserError("track.mlflow=true: no tracking server: set MLFLOW_TRACKING_URI or track.mlflow_uri")
        if uri.startswith(("http://", "https://")):
            try:
                with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10):
                    pass
            except (urllib.error.URLError, OSError) as e:
                raise UserError(f"track.mlflow: the tracking server {uri} does not answer ({type(e).__name__}): "
                                "start it, or fix MLFLOW_TRACKING_URI / track.mlflow_uri") from None
    if track.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("track.wandb=true needs the wandb package: pip install 'ray-mae[wandb]'") from None
        offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")
        if not offline and not os.environ.get("WANDB_API_KEY"):
            raise UserError("track.wandb=true: set WANDB_API_KEY (wandb login), or WANDB_MODE=offline")


def flat(d: dict, prefix: str = "") -> dict[str, str]:
    """A nested config -> {"section.field": "value"} (tracker parameters are strings)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if not isinstance(v, str) else v
    return out


def numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}


# ---------------------------------------------------------------------------- the trackers
class MLflowTracker:
    name = "mlflow"

    def __init__(self, track, run_name: str):
        self.track, self.run_name = track, run_name
        self.client, self.run_id, self.last_step = None, None, -1

    def start(self, params: dict, resume_id: str | None) -> str:
        from mlflow.tracking import MlflowClient  # imported here, on the tracking thread (seconds)
        c = self.client = MlflowClient(mlflow_uri(self.track))
        if resume_id:
            self.run_id = resume_id
            c.update_run(resume_id, status="RUNNING")
            hist = c.get_metric_history(resume_id, "loss")
            self.last_step = max((m.step for m in hist), default=-1)
            return resume_id
        exp = c.get_experiment_by_name(self.track.experiment)
        exp_id = exp.experiment_id if exp else c.create_experiment(self.track.experiment)
        tags = {"mlflow.parentRunId": self.track.mlflow_parent} if self.track.mlflow_parent else {}
        if self.track.group:
            tags["mae.search"] = self.track.group
        run = c.create_run(exp_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param
        items = [Param(k, v[:6000]) for k, v in flat(params).items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            c.log_batch(self.run_id, params=items[i:i + 100])
        return self.run_id

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if step <= self.last_step:
            return
        import time

        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
        self.last_step = step

    def image(self, step: int, name: str, img: np.ndarray) -> None:
        self.client.log_image(self.run_id, img, artifact_file=f"pictures/{name}_{step:08d}.png")

    def reference(self, key: str, uri: str) -> None:
        self.client.set_tag(self.run_id, key, uri)

    def table(self, name: str, rows: list[dict]) -> None:
        self.client.log_dict(self.run_id, rows, f"{name}.json")

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


class WandbTracker:
    name = "wandb"

    def __init__(self, track, run_name: str, local_dir: str, store=None):
        self.track, self.run_name, self.local_dir, self.store = track, run_name, local_dir, store
        self.run, self.last_step = None, -1

    def start(self, params: dict, resume_id: str | None) -> str:
        os.makedirs(self.local_dir, exist_ok=True)
        import tempfile
        saved, tempfile.tempdir = tempfile.tempdir, self.local_dir
        try:  # wandb's import makes temp dirs of its own (media, artifacts): in the attempt's
            # scratch dir, which goes with the attempt (or, killed, with the next one's sweep)
            import wandb

            from pipeline.private_api import import_wandb_media_tempdirs
            import_wandb_media_tempdirs()
        finally:
            tempfile.tempdir = saved
        import secrets
        run_id = resume_id or secrets.token_hex(4)
        saved_tmp = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = self.local_dir  # where wandb's service process keeps its files, too
        try:
            self.run = wandb.init(project=self.track.experiment, name=self.run_name, id=run_id, resume="allow",
                                  group=self.track.group or None, config=params, dir=self.local_dir,
                                  settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        finally:
            if saved_tmp is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = saved_tmp
        self.last_step = max(-1, int(getattr(self.run, "step", 0) or 0) - 1) if resume_id else -1
        return run_id

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if step <= self.last_step:
            return
        self.run.log(values, step=step)
        self.last_step = step

    def image(self, step: int, name: str, img: np.ndarray) -> None:
        import wandb
        self.run.log({name: wandb.Image(img)}, step=max(step, self.last_step))

    def reference(self, key: str, uri: str) -> None:
        self.run.summary[key] = uri

    def table(self, name: str, rows: list[dict]) -> None:
        import wandb
        cols = sorted({k for r in rows for k in r})
        self.run.log({name: wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])})

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)
        if self.store is not None and self.run.settings.mode == "offline":
            # an offline run (no network on the cluster) goes with the run: `wandb sync` it from a pulled
            # copy (its run directories only: not the service's own files beside them)
            for root, _, files in os.walk(os.path.join(self.local_dir, "wandb")):
                for fn in files:
                    path = os.path.join(root, fn)
                    if os.path.isfile(path) and not os.path.islink(path):
                        self.store.put(path, "wandb/" + os.path.relpath(path, self.local_dir))


# ---------------------------------------------------------------------------- the fan-out
class Tracking:
    """Rank 0's trackers, fed from the training thread through a queue (never blocking it)."""

    def __init__(self, cfg, run, *, run_name: str, local_dir: str, extra: list | None = None):
        self.run_store, self.cfg = run, cfg
        self.trackers: list = list(extra or [])
        if cfg.track.mlflow:
            self.trackers.append(MLflowTracker(cfg.track, run_name))
        if cfg.track.wandb:
            self.trackers.append(WandbTracker(cfg.track, run_name, os.path.join(local_dir, "wandb"), run))
        self.failed: set[str] = set()
        self.q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="mae-tracking", daemon=True)
        self.thread.start()

    def _call(self, tracker, method: str, *args) -> None:
        if tracker.name in self.failed:
            return
        try:
            getattr(tracker, method)(*args)
        except Exception as e:  # noqa: BLE001 - a tracker never stops the run
            self._failed(tracker.name, f"{method}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")

    def _failed(self, name: str, why: str) -> None:
        """One warning line, and the tracker left alone for the rest of the attempt; the run's
        tracking.json says which tracker failed and why (where a user looks after the run)."""
        self.failed.add(name)
        say(f"[mae] warning: tracker {name} failed ({why}); it logs nothing more in this attempt, training goes on")
        try:
            state = json.loads(self.run_store.read_if_exists(STATE_FILE) or b"{}")
            state.setdefault("failed", {})[name] = why
            self.run_store.write(STATE_FILE, json.dumps(state).encode())
        except Exception:  # noqa: BLE001 - the note is best effort
            pass

    def _work(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                self.q.task_done()
                return
            fn, args = item
            try:
                fn(*args)
            finally:
                self.q.task_done()

    def _each(self, method: str, *args) -> None:
        for t in self.trackers:
            self.q.put((self._call, (t, method, *args)))

    def submit(self, fn, *args) -> None:
        """Any other work off the training thread (e.g. syncing TensorBoard files)."""
        self.q.put((fn, args))

    # the calls of the training loop
    def start(self, params: dict) -> None:
        self.q.put((self._start, (params,)))

    def _start(self, params: dict) -> None:
        try:
            state = json.loads(self.run_store.read_if_exists(STATE_FILE) or b"{}")
        except ValueError:
            state = {}
        changed = False
        for t in self.trackers:
            if t.name in self.failed:
                continue
            try:
                rid = t.start(params, state.get(t.name))
            except Exception as e:  # noqa: BLE001
                self._failed(t.name, f"start: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
                state = json.loads(self.run_store.read_if_exists(STATE_FILE) or b"{}")
                continue
            if rid and state.get(t.name) != rid:
                state[t.name], changed = rid, True
        if changed:
            self.run_store.write(STATE_FILE, json.dumps(state).encode())

    def metrics(self, step: int, metrics: dict) -> None:
        self._each("metrics", step, numeric(metrics))

    def image(self, step: int, name: str, img: np.ndarray) -> None:
        self._each("image", step, name, img)

    def reference(self, key: str, uri: str) -> None:
        self._each("reference", key, uri)

    def table(self, name: str, rows: list[dict]) -> None:
        self._each("table", name, rows)

    def close(self, ok: bool, timeout_s: float = 120.0) -> None:
        """Finish the trackers' runs and wait (bounded) for the queue to drain."""
        self._each("close", ok)
        self.q.put(None)
        self.thread.join(timeout=timeout_s)
        if self.thread.is_alive():
            say(f"[mae] warning: trackers still busy after {timeout_s:.0f} s at the end of the attempt; not waiting")


# ---------------------------------------------------------------------------- a Tune search
def search_parent(track, tune_dir_store, name: str, space: dict) -> str | None:
    """The MLflow run of a whole search, under which every trial's run is nested; created once
    and kept in the search's ``tracking.json`` (a restored search keeps its parent)."""
    if not track.mlflow:
        return None
    state = json.loads(tune_dir_store.read_if_exists(STATE_FILE) or b"{}")
    if state.get("mlflow_parent"):
        return state["mlflow_parent"]
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient
    c = MlflowClient(mlflow_uri(track))
    exp = c.get_experiment_by_name(track.experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(track.experiment)
    run = c.create_run(exp_id, run_name=f"search {name}", tags={"mae.search": name})
    c.log_batch(run.info.run_id, params=[Param(f"space.{k}", json.dumps(v)[:6000]) for k, v in space.items()])
    state["mlflow_parent"] = run.info.run_id
    tune_dir_store.write(STATE_FILE, json.dumps(state).encode())
    return run.info.run_id


def finish_search(track, parent: str | None, rows: list[dict]) -> None:
    """The search's results table on its MLflow run, which is then finished."""
    if not (track.mlflow and parent):
        return
    from mlflow.tracking import MlflowClient
    c = MlflowClient(mlflow_uri(track))
    c.log_dict(parent, rows, "results.json")
    c.set_terminated(parent, status="FINISHED")


# ---------------------------------------------------------------------------- evaluations
def log_evaluation(ckpt_uri: str, results: dict[str, dict]) -> list[str]:
    """``mae evaluate``'s table, logged to the tracker runs of the run the checkpoint belongs to
    (its ``tracking.json`` and ``config.yaml``), beside its training curves. Never fails the
    evaluation: -> the trackers logged to (a failure is one warning line)."""
    from jobs.core.config import PretrainConfig
    from pipeline.storage import Store, parse_uri
    ck = parse_uri(ckpt_uri)
    run = Store(str(ck.parent()))
    try:
        state = json.loads(run.read_if_exists(STATE_FILE) or b"{}")
        raw = run.read_if_exists("config.yaml")
        if not raw or not ({"mlflow", "wandb"} & set(state)):
            return []
        import yaml
        track = PretrainConfig.from_dict(yaml.safe_load(raw)).track
    except Exception:  # noqa: BLE001 - not a run of ours: nothing to log to
        return []
    name = ck.path.rstrip("/").rsplit("/", 1)[-1]
    rows = [{"encoder": k, **{m: v for m, v in r.items() if isinstance(v, (int, float, str)) or v is None}}
            for k, r in results.items()]
    done = []
    if state.get("mlflow") and track.mlflow:
        try:
            import time

            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient
            c = MlflowClient(mlflow_uri(track))
            c.log_dict(state["mlflow"], rows, f"evaluation/{name}.json")
            step = int(name.rsplit("_", 1)[-1]) if name.rsplit("_", 1)[-1].isdigit() else 0
            now = int(time.time() * 1000)
            for r in rows:
                if r["encoder"] == "trained":  # the scores as metrics at the checkpoint's step
                    c.log_batch(state["mlflow"], metrics=[Metric(f"eval/{k}", float(v), now, step)
                                                          for k, v in r.items() if isinstance(v, float)])
            done.append("mlflow")
        except Exception as e:  # noqa: BLE001
            say(f"[mae] warning: could not log the evaluation to mlflow ({type(e).__name__})")
    if state.get("wandb") and track.wandb:
        try:
            import tempfile

            import wandb
            d = tempfile.mkdtemp(prefix="mae-wandb-")
            r = wandb.init(project=track.experiment, id=state["wandb"], resume="allow", dir=d,
                           settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
            cols = sorted({k for row in rows for k in row})
            r.log({f"evaluation/{name}": wandb.Table(columns=cols, data=[[row.get(c) for c in cols] for row in rows])})
            offline = r.settings.mode == "offline"
            r.finish()
            if offline:  # beside the training run's offline records
                for root, _, files in os.walk(d):
                    for fn in files:
                        path = os.path.join(root, fn)
                        run.put(path, "wandb/" + os.path.relpath(path, d))
            import shutil
            shutil.rmtree(d, ignore_errors=True)
            done.append("wandb")
        except Exception as e:  # noqa: BLE001
            say(f"[mae] warning: could not log the evaluation to wandb ({type(e).__name__})")
    return done
