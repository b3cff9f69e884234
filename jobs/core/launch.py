"""Launching a pretraining run: the plan the driver makes (batch, steps, schedule, probe and
picture images) and the Ray Train run (TorchTrainer's process group, see :mod:`jobs.core.backend`)
that runs :mod:`jobs.core.trainer` on every worker.

Used by ``mae pretrain``, ``mae tune`` (one call per trial) and ``mae demo``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import numpy as np

from jobs.core import checkpoint as ckpt
from jobs.core.common import RunFailed, UserError, failure_line
from jobs.core.config import PretrainConfig
from jobs.core.faults import Faults
from jobs.core.plan import RunPlan, by_reference
from pipeline.cluster import check_visible_to_cluster
from pipeline.dataset import build_dataset
from pipeline.sources import SourceInfo, resolve
from pipeline.storage import Store, fsspec_fs, parse_uri, pyarrow_fs, read_bytes, storage_errors


def cpu_needs(cfg: PretrainConfig) -> tuple[float, float]:
    """-> (CPUs the Train workers hold, CPUs the data pipeline needs to make progress: one decode
    task plus the sliver of the task that lists each epoch's items)."""
    return cfg.scaling.num_workers * cfg.scaling.cpus_per_worker, cfg.data.decode_cpus + 0.01


def paths_of(cfg: PretrainConfig) -> dict:
    """The paths every node of the run must see."""
    return {"data.source": cfg.data.source, "run.storage_path": cfg.run.storage_path,
            "model.init_from": cfg.model.init_from}


def run_dir_of(cfg: PretrainConfig) -> str:
    return str(parse_uri(cfg.run.storage_path).join(cfg.run.name))


def _labeled_images(cfg: PretrainConfig, split: str, n: int) -> tuple[list[bytes], list[int]]:
    """Up to n (image bytes, label) of a split: the first n of its probe file (bytes read in
    proportion to n); for shards without one, spread evenly over the split's files."""
    info = resolve(cfg.data.source, split, cfg.data.val_fraction or 0.2, cfg.data.seed)
    probe = (info.manifest.get("probe") or {}).get(split) if info.kind == "parquet" else None
    if probe:  # written by `mae prepare`: the first n rows are a class-balanced sample; read only those
        import pyarrow.parquet as pq
        fs, _ = pyarrow_fs(info.uri)
        path = parse_uri(info.uri).join(probe["file"])
        with storage_errors(path), fs.open_input_file(path.path) as f:
            pf = pq.ParquetFile(f)
            groups, rows = [], 0
            while rows < n and len(groups) < pf.num_row_groups:
                rows += pf.metadata.row_group(len(groups)).num_rows
                groups.append(len(groups))
            t = pf.read_row_groups(groups, columns=["image", "label"]).slice(0, n)
        pairs = [(i, lab) for i, lab in zip(t["image"].to_pylist(), t["label"].to_pylist()) if lab is not None]
    elif info.kind == "parquet":  # shards of an earlier version, without a probe split
        import pyarrow.parquet as pq
        fs, _ = pyarrow_fs(info.uri)
        # Evenly spaced over the whole split (shards are sorted by key, i.e. by class): read the
        # label column everywhere, the image column only of files that hold a chosen row.
        rows = []
        for f in info.files:
            labs = pq.read_table(f, filesystem=fs, columns=["label"])["label"].to_pylist()
            rows += [(f, i, lab) for i, lab in enumerate(labs) if lab is not None]
        chosen = [rows[int(j)] for j in np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int))] \
            if rows else []
        pairs = []
        for f in dict.fromkeys(c[0] for c in chosen):
            idx = [c[1] for c in chosen if c[0] == f]
            images = pq.read_table(f, filesystem=fs, columns=["image"])["image"].take(idx).to_pylist()
            pairs += list(zip(images, [c[2] for c in chosen if c[0] == f]))
    else:
        from pipeline.sources import label_of, relative_key
        fs, _ = fsspec_fs(info.uri)
        idx = {c: i for i, c in enumerate(info.classes or [])}
        step = max(1, len(info.files) // max(1, n))
        pairs = [(fs.cat_file(p), label_of(relative_key(parse_uri(info.uri), p), idx)) for p in info.files[::step][:n]]
        pairs = [(i, lab) for i, lab in pairs if lab is not None]
    if not pairs:
        raise UserError(f"{cfg.data.source}: the {split!r} split has no labeled images for the k-NN probe")
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _patches(cfg: PretrainConfig, datas: list[bytes], labels=None):
    """Eval transform (resize + center crop) -> uint8 patches; undecodable images dropped."""
    if not datas and labels is None:  # no pictures asked for: nothing to decode (and torch not imported)
        return None
    from pipeline.decode import SkipImage
    from pipeline.transforms import transform_image
    ecfg = cfg.data.transform()
    ecfg = type(ecfg)(**{**ecfg.__dict__, "train": False})
    out, keep = [], []
    for i, d in enumerate(datas):
        try:
            out.append(transform_image(d, ecfg, np.random.default_rng(0)))
            keep.append(i)
        except SkipImage:
            continue
    arr = np.stack(out) if out else None
    return (arr, np.asarray([labels[i] for i in keep], np.int64)) if labels is not None else arr


def probe_data(cfg: PretrainConfig) -> dict | None:
    """Held-out labeled images for the in-training k-NN probe (the tuning objective)."""
    if not cfg.train.knn_eval:
        return None
    tr, tr_y = _patches(cfg, *_labeled_images(cfg, "train", cfg.train.knn_train_images))
    va, va_y = _patches(cfg, *_labeled_images(cfg, "val", cfg.train.knn_val_images))
    return {"train": tr, "train_y": tr_y, "val": va, "val_y": va_y}


def _vis_images(cfg: PretrainConfig, info: SourceInfo, n: int) -> list[bytes]:
    """A fixed set of validation images: the val split when there is one, else the first
    images of the training source (sorted by key), so pictures compare across steps."""
    if n <= 0:
        return []
    src = info
    if info.kind == "parquet" and "val" in info.manifest.get("splits", {}):
        src = resolve(cfg.data.source, "val")
    if src.kind == "parquet":
        import pyarrow.parquet as pq
        fs, _ = pyarrow_fs(src.uri)
        out = []
        for f in src.files:
            t = pq.read_table(f, filesystem=fs, columns=["image"])
            out.extend(t["image"].to_pylist()[: n - len(out)])
            if len(out) >= n:
                break
        return out
    fs, _ = fsspec_fs(src.uri)
    return [fs.cat_file(p) for p in src.files[:n]]


def batch_plan(cfg: PretrainConfig, resumed: dict | None) -> tuple[int, int]:
    """-> (global batch, accumulation steps). A resumed run keeps the global batch it was saved
    with, so that its schedule, epochs and images seen continue unchanged: with another number of
    workers the accumulation steps absorb the difference, or the resume is refused in one line."""
    per_step = cfg.train.batch_size * cfg.scaling.num_workers
    accum = cfg.optim.accum_steps
    if not resumed or "global_batch" not in resumed or resumed["global_batch"] == per_step * accum:
        return per_step * accum, accum
    saved = resumed["global_batch"]
    if saved % per_step:
        raise UserError(f"resume with {cfg.scaling.num_workers} workers x train.batch_size={cfg.train.batch_size}: "
                        f"the run's global batch {saved} is not a multiple of {per_step}; choose "
                        "train.batch_size and scaling.num_workers whose product divides it")
    return saved, saved // per_step


def make_plan(cfg: PretrainConfig, info: SourceInfo, t_launch: float, resumed: dict | None = None) -> RunPlan:
    from jobs.core.optim import scaled_lr

    mcfg = cfg.model.build()
    finetune = getattr(cfg, "finetune", None)
    global_batch, accum = batch_plan(cfg, resumed)
    rows = info.num_rows
    if not rows:
        raise UserError(f"{cfg.data.source}: the dataset holds no images")
    steps_per_epoch = rows // global_batch
    if steps_per_epoch < 1:
        raise UserError(f"{cfg.data.source}: {rows} images are fewer than one global batch of "
                        f"{global_batch} (batch_size x workers x accum_steps): lower train.batch_size")
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps >= 0 else round(cfg.optim.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, total)
    peak = cfg.optim.lr if cfg.optim.lr > 0 else scaled_lr(cfg.optim.base_lr, global_batch)
    precision = cfg.train.precision if cfg.train.precision != "auto" else ("bf16" if cfg.scaling.use_gpu else "fp32")
    # Started again after its last step (a resubmitted job, a relaunched Tune trial): nothing will
    # train, so the picture and probe images (read from storage and decoded here) are not needed.
    finished = bool(resumed) and resumed["step"] >= total
    vis = None
    imgs = None if finished else _patches(cfg, _vis_images(cfg, info, cfg.train.vis_images))
    if imgs is not None:
        rng = np.random.default_rng(cfg.train.seed + 12345)
        vis = {"patches": imgs, "noise": rng.random((len(imgs), mcfg.num_patches)).astype(np.float32)}
    flops, classes, eval_every = mcfg.train_flops_per_image(), 0, 0
    if finetune is not None:
        from mae_model.vit import flops_per_image
        classes = num_classes_of(cfg, info)
        flops = flops_per_image(mcfg, classes)
        eval_every = max(1.0, finetune.eval_every_epochs * steps_per_epoch)
    return RunPlan(run_dir=run_dir_of(cfg), global_batch=global_batch, accum_steps=accum,
                   steps_per_epoch=steps_per_epoch, total_steps=total, warmup_steps=warmup, peak_lr=peak,
                   precision=precision, flops_per_image=flops, rows=rows,
                   t_launch=t_launch, config_yaml=cfg.to_yaml(), finished=finished, vis=by_reference(vis),
                   probe=None if finished else by_reference(probe_data(cfg)), faults=Faults.from_env(),
                   num_classes=classes, eval_every=eval_every)


def num_classes_of(cfg, info: SourceInfo) -> int:
    """The classifier's classes: finetune.num_classes, else the training set's (manifest or folders)."""
    n = cfg.finetune.num_classes or len(info.classes or [])
    if n < 2:
        raise UserError(f"{cfg.data.source}: no class labels to fine-tune on: prepare a labeled dataset "
                        "(class_name/file.jpg folders, ImageNet's archives) or set finetune.num_classes")
    cfg.finetune.num_classes = n  # recorded in the run's config: what a reader of its checkpoints builds
    return n


def val_split_of(uri: str) -> str:
    """The split of a validation dataset to score: ``val`` where it has one, else its only split
    (a dataset prepared with ``--split val``, or with one split of any name); ``val`` for folders."""
    from pipeline.sources import read_manifest
    splits = sorted(((read_manifest(parse_uri(uri)) or {}).get("splits") or {"val": None}))
    return "val" if "val" in splits else splits[0]


def val_source(cfg, train: SourceInfo) -> SourceInfo:
    """The validation set a fine-tuning run scores every epoch: ``finetune.val`` (its ``val`` split,
    else its only one) or the val split of ``data.source``; its classes must be the training set's."""
    f = cfg.finetune
    uri = f.val or cfg.data.source
    split = f.val_split or (val_split_of(uri) if f.val else "val")
    try:
        info = resolve(uri, split, cfg.data.val_fraction, cfg.data.seed)
    except Exception as e:  # noqa: BLE001 - one line naming the fix
        raise UserError(f"validation set: {e}; give one with --val DATASET (mae prepare ... --split val)") from None
    if info.kind == "images" and cfg.data.val_fraction <= 0 and not f.val:
        raise UserError(f"{uri}: an image folder has no val split: set data.val_fraction or give --val DATASET")
    if train.classes and info.classes and list(info.classes) != list(train.classes):
        raise UserError(f"{uri}: its classes ({len(info.classes)}, e.g. {info.classes[:3]}) are not the training "
                        f"set's ({len(train.classes)}, e.g. {train.classes[:3]}): prepare it with "
                        "--classes-from TRAIN_DATASET")
    return info


def fit(cfg: PretrainConfig, t_launch: float | None = None, verbose: bool = True, callbacks=None,
        check_cpus: bool = True):
    """Prepare the run, announce it, build the Ray Train run and fit it. -> (ray.train.Result, RunPlan)."""
    from pipeline.runactor import release_run_actor, run_actor_name

    t_launch = t_launch or time.time()
    run, latest, resumed, plan, info = prepare_run(cfg, t_launch, check_cpus)
    if plan.finished:  # started again (a resubmitted job, a relaunched Tune trial): nothing to train
        return finished_result(run, latest, resumed, plan, verbose), plan
    start = resumed.get("images_seen", resumed["step"] * plan.global_batch) if resumed else 0
    try:
        datasets, plan = build_stream(cfg, plan, info, run, start)
        if getattr(cfg, "finetune", None) is not None:
            datasets["val"] = build_val(cfg, val_source(cfg, info), run)
        # Save the resolved config with the run (credentials never appear in it: they are not config).
        run.write("config.yaml", cfg.to_yaml().encode())
        if verbose:
            announce(cfg, plan, run, latest, start)
        return fit_keeping_sigint(build_trainer(cfg, plan, datasets, callbacks)), plan
    finally:  # the run's actor, and its validation set's (fine-tuning), go with the run, however it ends
        for run_id in (str(run), val_run_id(run)):
            release_run_actor(run_actor_name(run_id))  # the one actor of its counters and position


def prepare_run(cfg: PretrainConfig, t_launch: float, check_cpus: bool):
    """Checks before anything starts, the run's last complete checkpoint and the plan.
    -> (run store, latest checkpoint entry or None, its train state or None, plan, source info)."""
    from jobs.core.common import check_data_cpus
    from jobs.core.placement import check_placement
    if check_cpus:  # off in a Tune trial: `mae tune` checked that a whole trial fits
        check_data_cpus(*cpu_needs(cfg), what=f"run {cfg.run.name}")
    from jobs.core.tracking import check_trackers
    check_trackers(cfg.track)  # installed and reachable, before any worker holds a GPU
    check_visible_to_cluster(paths_of(cfg), shared_fs=cfg.run.shared_fs, setting="run.shared_fs=true")
    run = Store(run_dir_of(cfg))
    latest = ckpt.latest_complete(run)
    resumed = ckpt.read_train_state(run.child(latest["name"])) if latest else None
    if run.exists("FAILED.json"):
        run.rm(["FAILED.json"])  # a new attempt resumes from the last good checkpoint
    info = resolve(cfg.data.source, cfg.data.split, cfg.data.val_fraction, cfg.data.seed)
    plan = make_plan(cfg, info, t_launch, resumed)
    if check_cpus and not plan.finished:  # per node: the cheap part of `mae preflight`
        check_placement(cfg, what=f"run {cfg.run.name}")
    return run, latest, resumed, plan, info


def build_stream(cfg: PretrainConfig, plan: RunPlan, info: SourceInfo, run: Store, start: int):
    """The dataset(s) from image ``start`` on: one stream for the rest of the run, plus spare epochs
    (2%, at least one) for images skipped as corrupt (rows of the stream that yield no image); a
    run longer than ``data.segment_images`` images is streamed in segments instead, from two
    datasets (:mod:`pipeline.segments`), without end (the workers stop at the last step).
    -> ({Ray Train's name: dataset}, the plan with the stream and its resume-position actor)."""
    from pipeline.dataset import build_segments
    from pipeline.segments import SLOTS, epochs_per_segment
    from pipeline.stream import position_actor
    epochs = math.ceil(max(0, plan.total_steps * plan.global_batch - start) / plan.rows)
    epochs += max(1, math.ceil(0.02 * epochs))
    position = position_actor(run_id=str(run))
    per_segment = cfg.data.segment_images
    if cfg.data.deterministic and per_segment > 0:
        # one image per block (pipeline.dataset._dataset): as many blocks per segment as a
        # shuffled stream's, where a block holds data.output_block_rows images
        per_segment = max(1, per_segment // cfg.data.output_block_rows)
    k = epochs_per_segment(per_segment, plan.rows, epochs)
    if not k:
        ds, _, stream = build_dataset(cfg.data, epochs=epochs, start_image=start, run_id=str(run), source=info)
        return {SLOTS[0]: ds}, plan.with_stream(stream, position)
    pair, _, stream = build_segments(cfg.data, epochs_per_segment=k, start_image=start, run_id=str(run), source=info)
    return dict(zip(SLOTS, pair)), plan.with_stream(stream, position, segment_epochs=k)


def announce(cfg: PretrainConfig, plan: RunPlan, run: Store, latest: dict | None, start: int) -> None:
    accum = (f", accum {plan.accum_steps} (keeps the saved global batch)"
             if plan.accum_steps != cfg.optim.accum_steps else "")
    print(f"[mae] run {run}: {plan.rows} images, global batch {plan.global_batch}{accum}, "
          f"{plan.total_steps} steps ({plan.steps_per_epoch}/epoch), warmup {plan.warmup_steps}, "
          f"peak lr {plan.peak_lr:.3g}, {cfg.scaling.num_workers} workers, {plan.precision}"
          + (f"; resuming from {latest['uri']} ({start} images seen)" if latest else ""), flush=True)
    if cfg.data.decode == "gpu" and not cfg.scaling.use_gpu:
        print("[mae] data.decode=gpu without GPUs: the training workers decode on their CPUs (slower than "
              "data.decode=cpu; meant for tests)", flush=True)


def val_run_id(run: Store) -> str:
    """The run id of a fine-tuning run's validation set: its own actor (counters, position), apart
    from the training stream's."""
    return f"{run}#val"


def build_val(cfg, info: SourceInfo, run: Store):
    """The validation set, center crops (resize to img_size/0.875, crop), read anew at every
    evaluation; split between the workers unevenly (every image scored once, see ValSplit)."""
    from dataclasses import replace
    vcfg = replace(cfg.data, source=info.uri, augment=False, auto_augment="", shuffle=False)
    ds, _, _ = build_dataset(vcfg, epochs=1, run_id=val_run_id(run), source=info)
    return ds


def build_trainer(cfg: PretrainConfig, plan: RunPlan, datasets, callbacks=None):
    """The Ray Train run: every worker runs :func:`jobs.core.worker.train_loop_per_worker` (fine-tuning:
    ``finetune_loop_per_worker``), with TorchTrainer's process-group setup from a config that keeps
    torch out of the controller. ``datasets``: {"train": the stream[, "val": the validation set]}."""
    import ray.train
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from jobs.core.backend import ProcessGroupConfig
    from jobs.core.datasplit import ValSplit
    from jobs.core.worker import finetune_loop_per_worker, train_loop_per_worker

    if not isinstance(datasets, dict):
        datasets = {"train": datasets}
    loop = finetune_loop_per_worker if "val" in datasets else train_loop_per_worker

    storage_fs, storage_root = pyarrow_fs(cfg.run.storage_path)
    if parse_uri(cfg.run.storage_path).scheme == "file":
        os.makedirs(storage_root, exist_ok=True)
    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
    return DataParallelTrainer(
        loop,
        train_loop_config={"cfg": cfg.to_dict(), "plan": plan},
        backend_config=ProcessGroupConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=cfg.scaling.placement_strategy),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage_root, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None), callbacks=callbacks or []),
        datasets=datasets,
        dataset_config=ValSplit(),
    )


def fit_keeping_sigint(trainer):
    """``trainer.fit()``, with the process's Ctrl-C handler as it was before.

    Train V2's fit() installs a Ctrl-C handler (in the main thread) that aborts its controller and
    leaves it installed: after the run, the first two Ctrl-C of the process (the next cell of a
    notebook, `mae demo` evaluating) only aborted the finished controller and the third exited the
    process; the handler's reference kept that controller and its dataset actors alive, ~1% of a
    core each, until the next fit."""
    import ray.train
    sigint = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        return trainer.fit()  # Train V2 raises when the run fails after its retries
    except ray.train.TrainingFailedError as e:
        raise RunFailed(failure_line(e)) from None
    finally:
        if sigint is not None:
            signal.signal(signal.SIGINT, sigint)


def finished_result(run: Store, latest: dict, state: dict, plan: RunPlan, verbose: bool):
    """The result of a run that already reached its last step, read from its newest complete
    checkpoint: no worker group is started for it (on a cluster, that is every GPU of the run held
    for minutes to report one line). The metrics are those its last checkpoint saved."""
    import ray.train

    from pipeline.private_api import train_result
    metrics = {**(state.get("metrics") or {}), "step": state["step"]}
    if verbose:
        print(f"[mae] run {run}: already reached step {state['step']} of {plan.total_steps} "
              f"({latest['uri']}); nothing to train", flush=True)
    fs, root = pyarrow_fs(latest["uri"])
    return train_result(metrics=metrics, checkpoint=ray.train.Checkpoint(root, filesystem=fs), path=str(run),
                        filesystem=fs)


def failure_of(cfg: PretrainConfig) -> str | None:
    u = parse_uri(run_dir_of(cfg)).join("FAILED.json")
    try:
        return json.loads(read_bytes(u))["error"]
    except Exception:  # noqa: BLE001 - no failure recorded
        return None
