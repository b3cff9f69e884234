"""mae tune [CONFIG.yaml] [overrides] [--search grid|random|optuna]: search mask ratio and decoder depth.

Each trial is a whole distributed pretraining run: a Tune function trainable builds and fits a
Ray Train V2 run (the pattern for TorchTrainer) whose metrics reach Tune through TuneReportCallback.

The objective is the k-NN top-1 on held-out labeled images (``knn_top1``), measured at every
report. The reconstruction loss is reported too but is NOT the objective: a higher mask ratio
always has a higher loss, yet 75% beats 50% downstream in the MAE paper. Trials are budgeted in
images seen (the same ``train.max_steps`` x global batch for all), early stopping is ASHA on the
objective with ``images_seen`` as its clock, and the best trial is chosen over every trial's whole
history (``scope="all"``), so that an early-stopped trial's last value cannot win by accident.

``--objective loss`` (minimized) is for searches whose trials share the mask ratio (a learning
rate, a warmup, a batch size) or data without labels; it is refused when the space varies the
mask ratio.

    mae tune jobs/configs/demo.yaml data.source=s3://b/shards run.storage_path=s3://b/tune \\
        --space model.overrides.mask_ratio=0.5,0.75,0.9 --space model.overrides.decoder_depth=1,4,8

The base config file is the first argument, given as it is (no option introduces it); it needs
train.max_steps (every trial's budget).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys

import yaml

from jobs.core.common import (STABLE_RESOURCE, UserError, cluster_capacity, init_ray, one_line_errors,
                               parse_config_command)
from jobs.core.config import PretrainConfig, load, set_field
from pipeline.cluster import check_visible_to_cluster
from pipeline.storage import parse_uri, pyarrow_fs, write_bytes

DEFAULT_SPACE = {"model.overrides.mask_ratio": [0.5, 0.75, 0.9], "model.overrides.decoder_depth": [1, 4, 8]}
OBJECTIVE = "knn_top1"  # the default objective
OBJECTIVES = {"knn_top1": "max", "loss": "min"}  # objective -> the direction that is better


def check_objective(objective: str, space: dict) -> str:
    """-> the objective's mode; one line when it cannot rank the space's trials."""
    if objective not in OBJECTIVES:
        raise UserError(f"--objective {objective}: choose one of {', '.join(OBJECTIVES)}")
    if objective == "loss" and len(set(space.get("model.overrides.mask_ratio", []))) > 1:
        raise UserError("--objective loss cannot rank mask ratios (a higher ratio always has a higher loss, yet "
                        "0.75 beats 0.5 downstream): use --objective knn_top1, or search one mask ratio")
    return OBJECTIVES[objective]


def trial_config(base: dict, params: dict, trial_name: str, tune_dir: str,
                 objective: str = OBJECTIVE, data_cpus: float | None = None) -> PretrainConfig:
    cfg = PretrainConfig.from_dict(base)
    for k, v in params.items():
        set_field(cfg, k, v)
    cfg.run.storage_path = str(parse_uri(tune_dir).join("trials"))
    cfg.run.name = trial_name
    if data_cpus is not None and cfg.data.max_data_cpus is None:  # the trial's share of the cluster
        cfg.data.max_data_cpus = data_cpus
    cfg.train.knn_eval = cfg.train.knn_eval or objective == "knn_top1"
    if cfg.train.report_every == 0:  # the scheduler needs results between checkpoints
        cfg.train.report_every = cfg.train.log_every
    return cfg.validate()


def trial(config: dict) -> None:
    """The Tune function trainable: one whole Ray Train run."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.core.launch import fit
    ctx = ray.tune.get_context()
    cfg = trial_config(config["base"], config["params"], ctx.get_trial_id(), config["tune_dir"],
                       config.get("objective", OBJECTIVE), config.get("data_cpus"))
    # A non-finite loss ends the run with an "error" report (objective 0) that reaches Tune
    # through the callback; the search goes on.
    result, plan = fit(cfg, verbose=False, callbacks=[TuneReportCallback()], check_cpus=False)
    if plan.finished:  # relaunched after its driver was killed: no Train run reported for it
        ray.tune.report(result.metrics)


def parse_space(items: list[str]) -> dict:
    space = {}
    for it in items:
        if "=" not in it:
            raise UserError(f"--space {it!r}: write section.field=v1,v2,...")
        k, v = it.split("=", 1)
        space[k.strip()] = [yaml.safe_load(x) for x in v.split(",")]
    return space or dict(DEFAULT_SPACE)


DRIVER_CPUS = 0.01  # a trial's driver (the function trainable) holds a sliver; 0 is refused


def trial_resources(cfg: PretrainConfig) -> dict:
    """What one running trial holds: its driver, its Train workers and its data pipeline."""
    from jobs.core.launch import cpu_needs
    trainers, data = cpu_needs(cfg)
    return {"CPU": DRIVER_CPUS + trainers + data, "GPU": cfg.scaling.num_workers if cfg.scaling.use_gpu else 0}


def data_cpus_per_trial(cfg: PretrainConfig, cluster: dict, concurrent: int) -> float:
    """Each of ``concurrent`` trials' share of the CPUs its Train workers and driver leave: the
    limit of its Ray Data (``data.max_data_cpus``). Without it every trial's Ray Data sizes itself
    for the whole cluster, and concurrent trials fight over the same CPUs."""
    from jobs.core.launch import cpu_needs
    trainers, data = cpu_needs(cfg)
    free = cluster.get("CPU", 0.0) - concurrent * (DRIVER_CPUS + trainers)
    return max(data, round(free / max(1, concurrent), 3))


def driver_resources(cfg: PretrainConfig, cluster: dict) -> dict:
    """What a trial's driver holds: ``run.trial_driver_resources`` if set; else a sliver of
    ``STABLE_RESOURCE`` where some node advertises it (no CPU: the shipped heads have none to give),
    else of CPU. A trial's driver, its Train controller and its data stream's coordinator all live
    on the driver's node, so a spot node's reclaim would take the whole trial; the head of the
    shipped cluster configs advertises it, the spot groups do not."""
    if cfg.run.trial_driver_resources:
        return {"cpu": 0, **cfg.run.trial_driver_resources}
    if cluster.get(STABLE_RESOURCE, 0.0) > 0:
        return {"cpu": 0, STABLE_RESOURCE: 0.001}
    print(f"[tune] no node advertises the {STABLE_RESOURCE!r} resource: trial drivers may be placed on "
          "preemptible nodes (advertise it on the head or an on-demand group, docs/scaling.md)", flush=True)
    return {"cpu": DRIVER_CPUS}


def max_concurrent(cfg: PretrainConfig, cluster: dict) -> int:
    """Trials that fit the cluster at once, counting CPUs and GPUs; one line if not even one fits."""
    need = trial_resources(cfg)
    fits = [int((cluster.get(k, 0.0) + 1e-9) // v) for k, v in need.items() if v > 0]
    n = min(fits)
    if n < 1:
        have = {k: cluster.get(k, 0.0) for k in need}
        raise UserError(f"one trial needs {need['CPU']:g} CPUs and {need['GPU']:g} GPUs (its driver, "
                        "scaling.num_workers x scaling.cpus_per_worker, and data.decode_cpus for its data "
                        f"pipeline); the cluster has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs: "
                        "lower scaling.num_workers, scaling.cpus_per_worker or data.decode_cpus, or add nodes")
    return n


def _num(row, key, cast=float):
    """A finite number from a history row, else None."""
    if row is None:
        return None
    v = row.get(key)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return cast(v) if v == v and abs(v) != float("inf") else None


def _trial_checkpoint(tune_dir: str, trial_id: str | None) -> str | None:
    """The URI of a trial's newest complete checkpoint (its run lives in TUNE_DIR/trials/ID)."""
    if not trial_id:
        return None
    from jobs.core.checkpoint import latest_complete
    try:
        c = latest_complete(str(parse_uri(tune_dir).join("trials", trial_id)))
    except Exception:  # noqa: BLE001 - an unreadable trial directory: the table says so by a blank
        return None
    return c["uri"] if c else None


def results_table(grid, space: dict, tune_dir: str, objective: str = OBJECTIVE) -> list[dict]:
    """One row per trial, from the report of its history where the objective was best."""
    rows = []
    for r in grid:
        hist = r.metrics_dataframe
        best = None
        if hist is not None and objective in hist:
            h = hist.dropna(subset=[objective])
            if len(h):
                best = h.loc[h[objective].idxmax() if OBJECTIVES[objective] == "max" else h[objective].idxmin()]
        params = r.config["params"]
        rows.append({**{k: params.get(k) for k in space},
                     "trial": r.metrics.get("trial_id") if r.metrics else None,
                     OBJECTIVE: _num(best, OBJECTIVE),
                     "loss": _num(best, "loss"),
                     "images_per_s": _num(best, "throughput/images_per_s"),
                     "images_seen": _num(best, "images_seen", int),
                     "stopped_at_images": int(hist["images_seen"].max()) if hist is not None and "images_seen" in hist else None,
                     "checkpoint": _trial_checkpoint(tune_dir, r.metrics.get("trial_id") if r.metrics else None),
                     "error": r.metrics.get("error") if r.metrics else str(r.error) if r.error else None})
    return rows


def write_results(rows: list[dict], tune_dir: str, best_cfg: PretrainConfig | None) -> None:
    u = parse_uri(tune_dir)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_bytes(u.join("results.csv"), buf.getvalue().encode())
    cols = list(rows[0])
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join("" if r[c] is None else (f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]))
                             for c in cols) + " |" for r in rows]
    write_bytes(u.join("results.md"), ("\n".join(md) + "\n").encode())
    if best_cfg is not None:
        best_cfg.train.knn_eval = False
        best_cfg.run.storage_path = str(u.join("best-run"))
        best_cfg.run.name = "mae-best"
        best_cfg.track.group, best_cfg.track.mlflow_parent = "", ""  # a run of its own, not a trial
        write_bytes(u.join("best_config.yaml"), best_cfg.to_yaml().encode())


def optuna_searcher(objective: str = OBJECTIVE):
    """Optuna's TPE through Ray Tune's OptunaSearch, on the objective."""
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise UserError("--search optuna needs the optuna package: pip install 'ray-mae[search]' "
                        "(or pip install optuna)") from None
    return OptunaSearch(metric=objective, mode=OBJECTIVES[objective], seed=0)


def check_search(base: PretrainConfig, space: dict, storage: str, name: str, tune_dir: str) -> None:
    """Before anything starts: the paths the trials use, the trackers, and (a search tracked in
    MLflow or W&B) the search's own parent run / group that its trials join."""
    from jobs.core.launch import paths_of
    from jobs.core.tracking import check_trackers, search_parent
    check_visible_to_cluster({**paths_of(base), "run.storage_path": storage}, shared_fs=base.run.shared_fs,
                             setting="run.shared_fs=true")
    check_trackers(base.track)
    if base.track.mlflow or base.track.wandb:  # one search: its trials grouped under it
        from pipeline.storage import Store
        base.track.group = base.track.group or name
        base.track.mlflow_parent = base.track.mlflow_parent or search_parent(base.track, Store(tune_dir), name, space) or ""


def make_tuner(base: PretrainConfig, param_space: dict, *, trainable, scheduler, search_alg, name: str, storage: str,
               tune_dir: str, objective: str, data_cpus: float, num_samples: int, concurrent: int, restore: bool):
    """The Tuner: the search restored when its experiment exists (finished trials kept), else new."""
    from ray import tune
    fs, root = pyarrow_fs(storage)
    path = f"{root.rstrip('/')}/{name}"
    if restore and tune.Tuner.can_restore(path, storage_filesystem=fs):
        print(f"[tune] resuming {tune_dir}: finished trials are kept", flush=True)
        return tune.Tuner.restore(path, trainable=trainable, storage_filesystem=fs,
                                  resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space={"base": base.to_dict(), "tune_dir": tune_dir, "objective": objective,
                     "data_cpus": data_cpus, "params": param_space},
        tune_config=tune.TuneConfig(scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=concurrent, search_alg=search_alg),
        # A trial whose driver dies (its node reclaimed) is started again and resumes its run
        # from its latest complete checkpoint (the same run name and storage path)
        run_config=tune.RunConfig(name=name, storage_path=root, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=base.run.trial_retries)),
    )


def run_tune(base: PretrainConfig, space: dict, *, name: str, storage: str, search: str = "grid",
             num_samples: int = 1, grace_images: int | None = None, max_concurrent_trials: int | None = None,
             restore: bool = True, objective: str = OBJECTIVE):
    from ray import tune

    from jobs.core.placement import check_placement
    from jobs.core.tracking import finish_search
    mode = check_objective(objective, space)
    if parse_uri(storage).scheme == "file":
        os.makedirs(pyarrow_fs(storage)[1], exist_ok=True)
    tune_dir = str(parse_uri(storage).join(name))
    if search == "grid":
        param_space = {k: tune.grid_search(v) for k, v in space.items()}
    else:
        param_space = {k: tune.choice(v) for k, v in space.items()}
    # model-based (TPE): each trial's choice learns from the finished ones
    search_alg = optuna_searcher(objective) if search == "optuna" else None
    check_search(base, space, storage, name, tune_dir)
    cluster = cluster_capacity()
    fit_at_once = max_concurrent(base, cluster)  # also refuses a trial that cannot fit
    check_placement(base, what="one trial")  # per node, as each trial's workers are placed
    mc = min(max_concurrent_trials or fit_at_once, fit_at_once)
    budget = base.train.max_steps * base.train.batch_size * base.scaling.num_workers * base.optim.accum_steps
    scheduler = tune.schedulers.ASHAScheduler(
        time_attr="images_seen", metric=objective, mode=mode, max_t=max(1, budget),
        grace_period=grace_images or max(1, budget // 4), reduction_factor=2)
    data_cpus = data_cpus_per_trial(base, cluster, mc)
    tuner = make_tuner(base, param_space, trainable=tune.with_resources(trial, driver_resources(base, cluster)),
                       scheduler=scheduler, search_alg=search_alg, name=name, storage=storage, tune_dir=tune_dir,
                       objective=objective, data_cpus=data_cpus, num_samples=num_samples, concurrent=mc,
                       restore=restore)
    need = trial_resources(base)
    print(f"[tune] {tune_dir}: space {space}, {mc} concurrent trials of {need['CPU']:g} CPUs"
          + (f" and {need['GPU']} GPUs" if need["GPU"] else "") + f" (Ray Data: {data_cpus:g} CPUs each), "
          f"budget {budget} images per trial, objective {objective} ({mode})", flush=True)
    grid = tuner.fit()
    rows = results_table(grid, space, tune_dir, objective)
    best_cfg = None
    try:
        best = grid.get_best_result(metric=objective, mode=mode, scope="all")
        best_cfg = trial_config(base.to_dict(), best.config["params"], "best", tune_dir, objective)  # no share: a run alone
    except Exception:  # noqa: BLE001 - no trial reported the objective
        pass
    if rows:
        write_results(rows, tune_dir, best_cfg)
        finish_search(base.track, base.track.mlflow_parent, rows)
    return grid, rows, tune_dir


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mae tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="base pretrain YAML (see mae pretrain --help)")
    ap.add_argument("overrides", nargs="*", help="section.field=value overrides of the base config")
    ap.add_argument("--space", action="append", default=[],
                    help="section.field=v1,v2,... (default: mask_ratio 0.5,0.75,0.9 x decoder_depth 1,4,8)")
    ap.add_argument("--search", choices=["grid", "random", "optuna"], default="grid",
                    help="grid (every combination), random, or optuna (model-based TPE; pip install optuna)")
    ap.add_argument("--num-samples", type=int, default=1, help="random/optuna: trials; grid: repeats")
    ap.add_argument("--name", default="mae-tune")
    ap.add_argument("--grace-images", type=int, default=None, help="ASHA grace period in images seen")
    ap.add_argument("--max-concurrent", type=int, default=None)
    ap.add_argument("--objective", choices=sorted(OBJECTIVES), default=OBJECTIVE,
                    help="knn_top1 (max; default: labeled data) or loss (min; only when the trials share the "
                         "mask ratio, e.g. a learning-rate search, or the data has no labels)")
    return ap


def parse(argv: list[str], *, strict: bool = False) -> argparse.Namespace:
    return parse_config_command("mae tune", parser(), argv, strict=strict)


def checked(a: argparse.Namespace) -> tuple[PretrainConfig, dict]:
    """The base config and the space, every value validated: what fails on bad input, without
    Ray or storage."""
    base = load(a.config, a.overrides)
    if base.train.max_steps <= 0:
        raise UserError("train.max_steps must be set: every trial gets the same budget of images")
    space = parse_space(a.space)
    check_objective(a.objective, space)
    for k, vals in space.items():
        for v in vals:  # every value validated up front (a mask ratio of 2 too, not only its type)
            trial_cfg = PretrainConfig.from_dict(base.to_dict())
            set_field(trial_cfg, k, v)
            trial_cfg.validate()
    return base, space


def check(argv: list[str]) -> str | None:
    """What ``mae submit`` checks on the user's machine before a job exists (see
    ``jobs.pretrain.check``). -> the config file named, if any."""
    a = parse(argv, strict=True)
    checked(a)
    return a.config


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with one_line_errors("mae tune"):
        a = parse(argv)
        base, space = checked(a)
        init_ray(base.run.address or None, num_cpus=trial_resources(base)["CPU"])
        grid, rows, tune_dir = run_tune(base, space, name=a.name, storage=base.run.storage_path,
                                        search=a.search, num_samples=a.num_samples,
                                        grace_images=a.grace_images, max_concurrent_trials=a.max_concurrent,
                                        objective=a.objective)
    print(f"[tune] results: {tune_dir}/results.md, results.csv; best config: {tune_dir}/best_config.yaml")
    for r in rows:
        print("  " + json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
