"""The Ray Train worker: FSDP2 MAE, AdamW with warmup + cosine, DCP checkpoints on storage.

Runs in every Train worker. Its only contact with the data is
``get_dataset_shard("train").iter_torch_batches(...)``, one stream that spans the run's epochs
(``pipeline.dataset``); every Ray Data setting lives there.

The loop reads as the recipe: ``resume``, then per step ``train_step`` (accumulated micro-batches,
clip, AdamW) and, where the cadence (:mod:`jobs.core.schedule`) says so, ``log`` (rank 0, local
files), ``report`` (to Ray, only where a Tune scheduler needs a result: ``ray.train.report`` is a
barrier of all workers behind a ~2 s controller poll) and ``save`` (:mod:`jobs.core.checkpointer`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from jobs.core.build import agree_strategy, build_model
from jobs.core.checkpoint import ckpt_name
from jobs.core.checkpointer import Checkpointer
from jobs.core.common import attempt_scratch, say, sweep_scratch
from jobs.core.config import PretrainConfig
from jobs.core.metrics import MetricsLogger, StepWindow
from jobs.core.optim import build_optimizer, guarded_step, lr_at
from jobs.core.plan import RunPlan, images
from jobs.core.probe import knn_top1, sharded_features
from jobs.core.schedule import Cadence
from jobs.core.tracking import Tracking
from jobs.core.visualize import reconstruction_grid, save_png
from mae_model.parallelize import set_gradient_sync, unwrap
from pipeline.dataset import iter_kwargs
from pipeline.storage import Store

warnings.filterwarnings("ignore", message=".*DTensor random operators.*")


def nonfinite_message(step: int, loss: float, lr: float, optim, last_step: int, peak: float) -> str:
    """The one line of a run stopped by a non-finite loss at ``step``: where, and how to go past it
    (``last_step``: the newest complete checkpoint, the one a relaunch resumes from, 0: none;
    ``peak``: the schedule's peak learning rate, whichever field set it)."""
    if optim.lr <= 0 and optim.base_lr > 0:
        lower = f"optim.base_lr={optim.base_lr / 2:.3g}"
    else:  # an absolute lr, or the recipe's (base_lr -1, as fine-tuning's default)
        lower = f"optim.lr={(optim.lr if optim.lr > 0 else peak) / 2:.3g}"
    since = (f"resumes from {ckpt_name(last_step)} (step {last_step})" if last_step
             else "starts again from step 0 (no checkpoint yet)")
    return (f"non-finite loss or gradients at step {step} (window loss {loss:.4g}, lr {lr:.3g}): the update was not "
            f"applied and the run stopped; to go past it, run the same job again (same run.name and "
            f"run.storage_path) with e.g. {lower}, optim.clip_grad=1.0, a longer warmup or train.precision=fp32: "
            f"it {since}")


class DataExhausted(RuntimeError):
    pass


def masking_seed(seed: int, rank: int, step: int) -> int:
    """A masking-noise stream of its own for every rank, derived from the step it starts at."""
    return (seed * 1_000_003 + rank * 7919 + step * 104_729 + 1) % (2**63)



class Prefetched:
    """An iterator whose first item is fetched in a background thread from construction on (the
    caller does other work meanwhile); later items are taken on the caller's thread. The first
    ``next()`` waits for that fetch and raises what it raised."""

    def __init__(self, it: Iterator):
        import threading
        self._it, self._first, self._error, self._ended = it, None, None, False
        self._thread: threading.Thread | None = threading.Thread(target=self._fetch, name="mae-first-batch",
                                                                 daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = next(self._it)
        except StopIteration:
            self._ended = True
        except BaseException as e:  # noqa: BLE001 - raised on the caller's thread by __next__
            self._error = e

    def __iter__(self) -> Prefetched:
        return self

    def __next__(self):
        if self._thread is None:
            return next(self._it)
        self._thread.join()
        self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._ended:
            raise StopIteration
        first, self._first = self._first, None
        return first


class Trainer:
    """One worker's part of a run. Built from the resolved config and the driver's plan."""

    def __init__(self, cfg: PretrainConfig, plan: RunPlan):
        import ray.train
        import ray.train.torch

        self.cfg, self.plan = cfg, plan
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.precision = plan.precision
        # Small host-side agreements (checkpoint choice, report timing) on a CPU group.
        self.cpu_group = dist.new_group(backend="gloo") if self.device.type == "cuda" else None
        self.accum, self.global_batch = plan.accum_steps, plan.global_batch
        self.total, self.warmup, self.peak = plan.total_steps, plan.warmup_steps, plan.peak_lr
        self.run = Store(plan.run_dir)
        self.stream = plan.stream
        self.step, self.lr = 0, 0.0
        self.segment: int | None = None  # a segmented stream's segment being consumed (pipeline.segments)
        self.saved_metrics: dict = {}  # the resumed checkpoint's metrics
        self.scratch = attempt_scratch()  # and the dead attempts' scratch on this node goes
        self.ckpt = Checkpointer(cfg, self.run, rank=self.rank, world=self.world, scratch=self.scratch,
                                 cpu_group=self.cpu_group, global_batch=self.global_batch,
                                 config_yaml=plan.config_yaml, faults=plan.faults)
        # The data first: the checkpoint to resume from is chosen (two small reads), and the stream
        # starts from its position while the model is built and its weights load (a new execution
        # takes seconds to deliver its first batch: its tasks start, the first units are read and
        # decoded; on a restart that overlaps the checkpoint's load).
        self.choice = self.ckpt.choose()
        self.step = self.choice["state"]["step"] if self.choice else 0
        self.batches = self.open_stream() if self.step < self.total else None
        make = self.module_factory()
        self.strategy = agree_strategy(cfg, self.device, rank=self.rank, world=self.world,
                                       node_rank=ctx.get_node_rank(), local_rank=ctx.get_local_rank(),
                                       local_world=ctx.get_local_world_size(), group=self.cpu_group, make=make)
        self.model = build_model(cfg, self.device, self.strategy, self.precision, self.rank, self.world,
                                 ctx.get_local_world_size(), make=make)
        self.core = unwrap(self.model)  # the MaskedAutoencoder: features, pictures
        # DDP computes in bf16 under autocast (as the official code's AMP); FSDP2 casts its params
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if self.strategy == "ddp" and self.precision == "bf16" else contextlib.nullcontext())
        self.opt = self.build_optimizer()
        self.logger = MetricsLogger(os.path.join(self.scratch, "run"), self.run, self.total) if self.rank == 0 else None
        self.tracking = None
        if self.rank == 0:  # its queue and thread: trackers never hold up a step
            from jobs.core.faults import RaisingTracker
            self.tracking = Tracking(cfg, self.run, run_name=cfg.run.name, local_dir=self.scratch,
                                     extra=[RaisingTracker()] if plan.faults and plan.faults.raising_tracker else [])
        self.last_tb_sync = time.monotonic()
        self.window = StepWindow(self.device, world=self.world, global_batch=self.global_batch,
                                 flops_per_image=plan.flops_per_image, precision=self.precision,
                                 gpu_decode=cfg.data.decode == "gpu")
        # the probe's and the picture's images, from the object store (put there once by the driver)
        probe = images(plan.probe)
        self.probe = {k: torch.from_numpy(v) for k, v in probe.items()} if probe else None
        self.vis = images(plan.vis)
        self.first_log_done = False
        self.last_report = time.monotonic()
        # Ray Train's preemption notices (a node of the run is being drained for a spot reclaim):
        # read at log steps, where every rank is anyway; off where Ray Train's watcher is off
        self.watch_preemption = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1").lower() not in ("0", "false")
        self.last_notice = None

    # ------------------------------------------------------------------ what a task changes
    def module_factory(self):
        """-> a callable building the (meta-device) module; None: the MAE of ``cfg.model``."""
        return None

    def build_optimizer(self):
        return build_optimizer(self.model, lr=self.plan.peak_lr, weight_decay=self.cfg.optim.weight_decay,
                               betas=self.cfg.optim.betas, device_type=self.device.type)

    # ------------------------------------------------------------------ helpers
    def _broadcast(self, obj):
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def say(self, msg: str) -> None:
        if self.rank == 0:
            say(msg)

    # ------------------------------------------------------------------ resume
    def resume(self) -> None:
        """Continue from the checkpoint chosen at start-up (:meth:`Checkpointer.load`); else start
        fresh (optionally from ``init_from``). The data stream continues where its images end."""
        r = self.ckpt.load(self.choice, self.model, self.opt)
        if r is not None:
            self.step, self.saved_metrics = r.step, r.metrics
            if not r.restored_rng:  # another world size: fresh, distinct per-rank masking streams
                torch.manual_seed(masking_seed(self.cfg.train.seed, self.rank, self.step))
            self.say(f"[mae] resumed from {r.uri} at step {self.step} ({self.step * self.global_batch} images) "
                     f"with {self.world} workers (saved by {r.world_size})")
        else:
            torch.manual_seed(masking_seed(self.cfg.train.seed, self.rank, 0))
            if self.cfg.model.init_from:
                self._init_from(self.cfg.model.init_from)
        if self.rank == 0:
            self.logger.keep_until(self.step)  # the log continues from the checkpoint too
            self.tracking.start(self.cfg.to_dict())  # a resumed run continues its tracker runs
        dist.barrier(group=self.cpu_group)

    def open_stream(self) -> Prefetched:
        """Every rank's batches from the chosen checkpoint's position on: rank 0 sets the position
        on the run's actor before any rank starts the execution (also when this is a restarted
        worker group whose stream was built by the driver for an earlier position); each rank's
        first batch is then fetched in the background."""
        if self.rank == 0:
            import ray
            item, row = self.stream.locate(self.step * self.global_batch)
            ray.get(self.plan.position.set.remote(item, row))
        dist.barrier(group=self.cpu_group)
        return Prefetched(self._batches())

    def _init_from(self, uri: str) -> None:
        """Start from weights: read once (rank 0) and broadcast to the other ranks' shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from jobs.core.weights import init_state_dict
        sd = init_state_dict(uri, self.core.config, verbose=True) if self.rank == 0 else {}
        set_model_state_dict(self.model, sd, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True, strict=False))
        self.say(f"[mae] init_from {uri}: loaded {len(sd)} tensors (broadcast from rank 0)")

    # ------------------------------------------------------------------ steps
    def next_batch(self) -> torch.Tensor:
        t0 = time.perf_counter()
        batch = next(self.batches, None)
        waited = time.perf_counter() - t0
        self.window.wait += waited
        # Every rank gets the same number of batches: streaming_split(equal=True)'s OutputSplitter
        # gives each split exactly the same number of rows (it truncates the rest) and the
        # iterator drops the last partial batch, so no per-step agreement on the end is needed.
        if batch is None:
            raise DataExhausted(f"the data stream ended at step {self.step} of {self.total}: more images were "
                                "skipped as corrupt than the plan's spare epoch covers; see the skip counts")
        if self.cfg.data.decode == "gpu":  # JPEG bytes + crop boxes: decoded here, on the device
            from pipeline.gpu_decode import decode_on_device
            x, _, skipped = decode_on_device(batch["image"], batch["box"], batch["flip"], batch.get("orient"),
                                             img_size=self.cfg.data.img_size, patch_size=self.cfg.data.patch_size,
                                             device=self.device)
            self.window.device_skips += skipped
            self.window.device_decode_s += time.perf_counter() - t0 - waited
            # A batch none of whose images decoded (rare: all broken) repeats the last good one, so
            # that every rank still takes the same number of batches from its equal split.
            if x.shape[0]:
                self._last_x = x
            elif getattr(self, "_last_x", None) is not None:
                x = self._last_x
            return x
        return batch["patches"].to(self.device, non_blocking=True)

    def train_step(self) -> None:
        """``accum`` micro-batches (gradient sync on the last only), clip, one AdamW step. All the
        micro-batches are taken before any is run, so no partial accumulation reaches a step."""
        patches = [self.next_batch() for _ in range(self.accum)]
        step_loss = torch.zeros((), device=self.device)
        for micro, x in enumerate(patches):
            set_gradient_sync(self.model, micro == self.accum - 1)
            with self.autocast:
                loss, _, _ = self.model(x)
            (loss / self.accum).backward()
            step_loss += loss.detach() / self.accum
        self.lr = lr_at(self.step, peak=self.peak, warmup=self.warmup, total=self.total, min_lr=self.cfg.optim.min_lr)
        for g in self.opt.param_groups:
            g["lr"] = self.lr
        # Every step is checked on the device before it is applied; the log step reads the flags.
        bad = guarded_step(self.opt, self.model.parameters(), self.cfg.optim.clip_grad)
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.window.add_step(step_loss, bad, self.step)

    def metrics(self) -> dict:
        """The window since the last log step, averaged over ranks (:class:`StepWindow`)."""
        m = self.window.close(step=self.step, total=self.total, lr=self.lr,
                              rows_per_epoch=self.stream.rows_per_epoch, model=self.model, opt=self.opt)
        if self.ckpt.last_stall is not None:  # the last save's time on the training path
            m["time/checkpoint_stall_s"], self.ckpt.last_stall = self.ckpt.last_stall, None
        if self.segment is not None:  # a segmented stream: the segment this rank's batches come from
            m["data/segment"] = self.segment
        if not self.first_log_done:
            m["time/launch_to_first_log_s"] = time.time() - self.plan.t_launch
            self.first_log_done = True
        return m

    def check_finite(self, m: dict) -> bool:
        """The window's steps were all finite; else the run stops here, as the official code does
        (the non-finite steps were never applied: the weights are those of the last good step).
        The line names the step, the checkpoint a relaunch resumes from, and what to change."""
        if math.isfinite(m["loss"]) and not m["_skipped"]:
            return True
        at = m["_first_bad"] or self.step
        with contextlib.suppress(Exception):  # a failed save is not complete: the last complete one is named
            self.ckpt.wait()  # every rank: a save in flight completes, so the line names what is stored
        msg = nonfinite_message(at, m["loss"], self.lr, self.cfg.optim, self.ckpt.last_step, self.peak)
        if self.rank == 0:
            self.run.write("FAILED.json", json.dumps({"error": msg, "step": self.step}).encode())
            say(f"[mae] {msg}")
        import ray.train
        # The objective is reported as worthless (0), so that a Tune scheduler counts the diverged
        # trial instead of rejecting a result without its metric.
        ray.train.report({"error": msg, "step": self.step, "loss": float("nan"), "knn_top1": 0.0,
                          "images_seen": self.step * self.global_batch})
        return False

    def knn(self, m: dict) -> None:
        """The tuning objective on held-out labeled images: each rank embeds its share, every rank
        gets all features (all-gather) and computes the same k-NN."""
        model = self.model if self.strategy != "ddp" else self.core  # FSDP2: the root unshards its params
        ftr = sharded_features(model, self.probe["train"].to(self.device), self.rank, self.world)
        fva = sharded_features(model, self.probe["val"].to(self.device), self.rank, self.world)
        for kind in ("cls", "mean"):
            m[f"knn_top1/{kind}"] = knn_top1(ftr[kind], self.probe["train_y"], fva[kind], self.probe["val_y"])
        m["knn_top1"] = m[f"knn_top1/{self.cfg.train.knn_feature}"]

    def log(self, m: dict) -> None:
        if self.rank != 0:
            return
        self.logger.log(self.step, public(m), line=self.window.line(m, self.total))
        self.tracking.metrics(self.step, public(m))
        if self.cfg.track.tensorboard and time.monotonic() - self.last_tb_sync >= self.cfg.track.sync_every_s:
            self.tracking.submit(self.logger.sync_tb)
            self.last_tb_sync = time.monotonic()

    def report_due(self) -> bool:
        """Rank 0 decides for all ranks whether a metrics-only report is due: by its clock, and not
        while a checkpoint is still uploading (Ray queues a worker's reports in order, so a report
        made then would hold the loop until the upload is in)."""
        due = (time.monotonic() - self.last_report >= self.cfg.train.min_report_interval_s
               and not self.ckpt.busy())
        return bool(self._broadcast(due))

    def report(self, m: dict) -> None:
        import ray.train
        ray.train.report(public(m))
        self.last_report = time.monotonic()

    def save(self, m: dict) -> None:
        """A checkpoint of this step, carrying the step's report (:meth:`Checkpointer.save`)."""
        self.ckpt.save(self.model, self.opt, self.step, public(m),
                       state={"epoch": self.step * self.global_batch // self.stream.rows_per_epoch,
                              "accum_steps": self.accum, "strategy": self.strategy},
                       before_marker=self.logger.snapshot() if self.rank == 0 else None)
        self.last_report = time.monotonic()
        if self.rank == 0:
            self.tracking.reference("checkpoint_latest", self.run.uri_of(ckpt_name(self.step)))

    def picture(self) -> None:
        vis = self.vis
        if not vis:
            return
        patches = torch.from_numpy(vis["patches"].astype(np.uint8, copy=False)).to(self.device)
        noise = torch.from_numpy(vis["noise"].astype(np.float32, copy=False)).to(self.device)
        self.model.eval()
        img = reconstruction_grid(self.model if self.strategy != "ddp" else self.core, patches, noise)
        self.model.train()
        if self.rank == 0:
            path = os.path.join(self.scratch, f"reconstruction_{self.step:08d}.png")
            save_png(img, path)
            # uploaded off the training thread (the queue is drained before the scratch dir goes)
            self.tracking.submit(self.logger.put_file, path, f"pictures/reconstruction_{self.step:08d}.png")
            self.tracking.submit(self.logger.put_file, path, "reconstruction_latest.png")
            self.logger.image(self.step, "reconstruction", img)
            self.tracking.image(self.step, "reconstruction", img)

    def preempted(self) -> bool:
        """A node of this run is being preempted (Ray Train's notice: a barrier, called by every rank
        at the same steps) and no checkpoint was saved for this notice yet: save one now, before the
        node goes; Ray Train restarts the group from it once the node is gone."""
        if not self.watch_preemption:
            return False
        import ray.train
        try:
            info = ray.train.get_preemption_info()
        except (DeprecationWarning, RuntimeError):  # refused in a Tune session: Tune retries the trial
            self.watch_preemption = False
            return False
        if info is None or info == self.last_notice:
            return False
        self.last_notice = info
        nodes = ", ".join(n[:8] for n in info.preempted_node_to_ranks)
        self.say(f"[mae] node(s) {nodes} being preempted: checkpoint at step {self.step} before they go")
        return True

    def inject_faults(self) -> None:
        """Test-only (:mod:`jobs.core.faults`): a slow step, for events that must land mid-run; a
        worker SIGKILLed after this step."""
        f = self.plan.faults
        if f is not None:
            if f.step_sleep_s:
                time.sleep(f.step_sleep_s)
            f.kill_at(self.step, "step", self.run, self.rank, self.world)

    # ------------------------------------------------------------------ the loop
    def begin(self) -> Cadence | None:
        """Resume, then the data iterator and the cadence of the steps left; None: nothing to train."""
        self.resume()
        if self.step >= self.total:
            # The driver found the run unfinished, the index now says finished (another attempt's
            # last checkpoint completed in between; a finished run relaunched normally never gets
            # here: see launch.finished_result). Nothing to train; the caller still needs the result.
            self.say(f"[mae] the run already reached step {self.total}; reporting its final metrics")
            self.report(dict(self.saved_metrics, step=self.step))
            return None
        self.model.train()
        faults = self.plan.faults
        return Cadence.of(self.cfg.train, self.total, start=self.step,
                          stop_after=faults.stop_after_steps if faults else -1)

    def fit(self) -> None:
        """Resume, then: step, maybe log (with k-NN and picture), maybe report, maybe save."""
        cadence = self.begin()
        if cadence is None:
            return
        while self.step < self.total:
            self.train_step()
            self.inject_faults()
            at = cadence.at(self.step)
            if not at.log:
                continue
            report = at.report and self.report_due()
            save = at.checkpoint or self.preempted()
            m = self.metrics()
            if not self.check_finite(m):
                return
            if self.probe is not None and (report or save):
                self.knn(m)
            self.log(m)
            if at.picture:
                self.picture()
            if save:
                self.save(m)
            elif report:
                self.report(m)
            if at.stop:
                break

    def _batches(self):
        """This worker's batches from the step it starts at: its shard of the run's stream (one
        execution), or of the stream's segments, chained (:mod:`pipeline.segments`)."""
        import ray.train
        kw = iter_kwargs(self.cfg.data, self.cfg.train.batch_size, self.rank)
        gpu = self.cfg.data.decode == "gpu"

        def batches_of(shard, **extra):
            args = {**kw, **extra}
            return shard.iter_batches(batch_format="numpy", **args) if gpu else shard.iter_torch_batches(**args)
        if not self.plan.segment_epochs:
            return iter(batches_of(ray.train.get_dataset_shard("train")))
        from pipeline.segments import SLOTS, Segments, segment_batches
        shards = [ray.train.get_dataset_shard(name) for name in SLOTS]
        seg = Segments(self.plan.segment_epochs, self.stream.rows_per_epoch, self.world)

        def open_segment(s: int):
            if self.rank == 0:  # before this rank joins the slot's start: the execution reads it
                import ray
                ray.get(self.plan.position.set_segment.remote(s % 2, s))
                self.say(f"[mae] data: segment {s} (epochs {s * seg.epochs}-{(s + 1) * seg.epochs - 1}) "
                         f"streamed by {SLOTS[s % 2]}")
            salt = {"local_shuffle_seed": kw["local_shuffle_seed"] + 104_729 * s} if "local_shuffle_seed" in kw else {}
            return batches_of(shards[s % 2], drop_last=False, **salt)
        # the next segment opens ~30 s of training before the seam (or 4 read units ahead): its
        # execution's start and first units are ready by then; until the seam its output waits,
        # bounded by Ray Data's backpressure
        return segment_batches(open_segment, seg, start_image=self.step * self.global_batch,
                               batch_size=self.cfg.train.batch_size, lookahead_rows=4 * self.cfg.data.rows_per_unit,
                               lookahead_s=30.0, on_enter=lambda s: setattr(self, "segment", s))

    def close(self, ok: bool) -> None:
        """End of the attempt: the last save completes and the last metrics go up (after a clean
        end only: a failing attempt must not hide its error behind a second one); the scratch
        directory goes unless an upload still reads it."""
        try:
            self.ckpt.close(ok)
            if self.rank == 0 and ok:
                self.logger.sync()
        finally:
            if self.tracking is not None:
                self.tracking.close(ok)
            if self.logger is not None:
                self.logger.close()
            if self.ckpt.release_scratch():
                shutil.rmtree(self.scratch, ignore_errors=True)
            sweep_scratch()  # a killed attempt's dir whose process outlived this attempt's start


def public(m: dict) -> dict:
    """The metrics without the loop's private entries (``_name``)."""
    return {k: v for k, v in m.items() if not k.startswith("_")}
