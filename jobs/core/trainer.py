"""The Ray Train worker: FSDP2 MAE, AdamW with warmup + cosine, DCP checkpoints on storage.

Runs in every Train worker. Its only contact with the data is
``get_dataset_shard("train").iter_torch_batches(...)``, one stream that spans the run's epochs
(``pipeline.dataset``); every Ray Data setting lives there.

The loop reads as the recipe: ``resume``, then per step ``train_step`` (accumulated micro-batches,
clip, AdamW), ``log`` (rank 0, local files, every ``train.log_every``), ``report`` (to Ray, only at
checkpoints and where a Tune scheduler needs a result: ``ray.train.report`` is a barrier of all
workers behind a ~2 s controller poll) and ``checkpoint``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import math
import os
import shutil
import signal
import tempfile
import time
import warnings
from concurrent.futures import Future

import numpy as np
import torch
import torch.distributed as dist

from jobs.core import checkpoint as ckpt
from jobs.core.common import attempt_scratch, say
from jobs.core.config import PretrainConfig
from jobs.core.metrics import MetricsLogger, fmt_eta, local_state_mb, peak_flops, peak_memory_mb
from jobs.core.optim import build_optimizer, guarded_step, lr_at
from jobs.core.probe import knn_top1, sharded_features
from jobs.core.visualize import reconstruction_grid, save_png
from mae_model import MaskedAutoencoder
from mae_model.parallelize import (choose_strategy, compile_blocks, mixed_precision, parallelize, replicate,
                                   set_gradient_sync, unwrap)
from pipeline.dataset import Stream, iter_kwargs
from pipeline.storage import Store

warnings.filterwarnings("ignore", message=".*DTensor random operators.*")


class DataExhausted(RuntimeError):
    pass


def device_bytes(device: torch.device, local_world: int) -> int:
    """Memory one worker may plan with: its GPU's, or its share of the host's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local_world)


def build_model(cfg: PretrainConfig, device: torch.device, strategy: str, precision: str, rank: int,
                world: int, local_world: int):
    """Meta-device model -> parallelized by ``strategy`` -> materialized on ``device`` -> initialized.

    fsdp / hsdp: sharded before materializing (no rank ever holds the whole unsharded model);
    hsdp's mesh is (nodes, workers per node): shard within a node, replicate across nodes.
    ddp: materialized whole and wrapped (rank 0's weights are broadcast); one worker: plain.
    """
    from torch.distributed.device_mesh import init_device_mesh
    mcfg = cfg.model.build()
    with torch.device("meta"):
        model = MaskedAutoencoder(mcfg)
    if cfg.train.compile:
        compile_blocks(model)
    if strategy == "ddp":
        model.set_activation_checkpointing(cfg.model.activation_checkpointing)
        model.to_empty(device=device)
        torch.manual_seed(cfg.train.seed * 1000)
        model.init_weights()
        return replicate(model, device) if world > 1 else model
    if strategy == "hsdp":
        mesh = init_device_mesh(device.type, (world // local_world, local_world), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,))
    parallelize(model, mesh, mp_policy=mixed_precision("bf16" if precision == "bf16" else None),
                activation_checkpointing=cfg.model.activation_checkpointing,
                reshard_after_forward=cfg.train.reshard_after_forward)
    model.to_empty(device=device)
    # Per-rank seed: each rank initializes its own shard (on CUDA, DTensor's RNG tracker makes
    # the sharded init match an unsharded one; on CPU the shards are independent draws).
    torch.manual_seed(cfg.train.seed * 1000 + rank)
    model.init_weights()
    return model


def masking_seed(seed: int, rank: int, step: int) -> int:
    """A masking-noise stream of its own for every rank, derived from the step it starts at."""
    return (seed * 1_000_003 + rank * 7919 + step * 104_729 + 1) % (2**63)


class Trainer:
    """One worker's part of a run. Built from the resolved config and the driver's plan."""

    def __init__(self, cfg: PretrainConfig, plan: dict):
        import ray.train
        import ray.train.torch

        self.cfg, self.plan = cfg, plan
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.precision = plan["precision"]
        # Small host-side agreements (checkpoint choice, report timing) on a CPU group.
        self.cpu_group = dist.new_group(backend="gloo") if self.device.type == "cuda" else None
        # The upload threads' own group: their one gather per save (the file lists, once every
        # rank's upload is in storage) never meets a collective of the training thread.
        self.upload_group = (dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2))
                             if dist.get_world_size() > 1 else None)
        self.storage = ctx.get_storage()  # where Ray Train persists checkpoints (its own filesystem)
        self.strategy = self._agree_strategy(ctx.get_local_world_size(), ctx.get_node_rank(), ctx.get_local_rank())
        self.model = build_model(cfg, self.device, self.strategy, self.precision, self.rank, self.world,
                                 ctx.get_local_world_size())
        self.core = unwrap(self.model)  # the MaskedAutoencoder: features, pictures
        # DDP computes in bf16 under autocast (as the official code's AMP); FSDP2 casts its params
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if self.strategy == "ddp" and self.precision == "bf16" else contextlib.nullcontext())
        self.opt = build_optimizer(self.model, lr=plan["peak_lr"], weight_decay=cfg.optim.weight_decay,
                                   betas=cfg.optim.betas, device_type=self.device.type)
        self.accum = plan["accum_steps"]
        self.global_batch = plan["global_batch"]
        self.total, self.warmup, self.peak = plan["total_steps"], plan["warmup_steps"], plan["peak_lr"]
        self.run = Store(plan["run_dir"])
        self.stream = Stream(**plan["stream"])
        self.step, self.lr = 0, 0.0
        self.saved_metrics: dict = {}  # the resumed checkpoint's metrics
        self.scratch = attempt_scratch()  # and the dead attempts' scratch on this node goes
        self.logger = MetricsLogger(os.path.join(self.scratch, "run"), self.run, self.total) if self.rank == 0 else None
        self.finalizer = None
        self.ckpt_stall: float | None = None
        self.saving: Future | None = None  # this rank's last save, whose upload may still be in flight
        self.aborted = False  # the attempt ended while an upload was in flight
        self.peak_fl, self.peak_how = peak_flops(self.device, self.precision)
        self.vis = plan.get("vis")
        self.probe = {k: torch.from_numpy(np.asarray(v)) for k, v in plan["probe"].items()} if plan.get("probe") else None
        self.vis_every = cfg.train.vis_every or cfg.train.ckpt_every
        self.first_log_done = False
        self.last_report = time.monotonic()
        self.hooks = ([self._crash_once] if cfg.train.crash_at_step > 0 and not cfg.train.crash_in_upload
                      else [])  # testing aid, off the hot path
        self._reset_window()

    # ------------------------------------------------------------------ helpers
    def _agree_strategy(self, local_world: int, node_rank: int, local_rank: int) -> str:
        """Rank 0 picks the strategy (scaling.strategy, or auto by model size and device memory)
        and says why; hsdp needs the same number of workers on every node, ranks grouped by node."""
        layout = [None] * self.world
        dist.all_gather_object(layout, (node_rank, local_rank, local_world), group=self.cpu_group)
        choice = None
        if self.rank == 0:
            with torch.device("meta"):
                n_params = sum(p.numel() for p in MaskedAutoencoder(self.cfg.model.build()).parameters())
            name, why = choose_strategy(self.cfg.scaling.strategy, n_params=n_params,
                                        device_bytes=device_bytes(self.device, local_world),
                                        world=self.world, local_world=local_world)
            grouped = all(r == n * lw + lr and lw == local_world for r, (n, lr, lw) in enumerate(layout))
            if name == "hsdp" and not grouped:
                choice = {"error": "scaling.strategy=hsdp needs the same number of workers on every node (got "
                          f"{sorted(lw for _, lr, lw in layout if lr == 0)} per node): use "
                          "scaling.placement_strategy=STRICT_PACK per node group, or scaling.strategy=fsdp"}
            else:
                choice = {"name": name, "why": why}
                say(f"[mae] strategy {name}: {why}")
        choice = self._broadcast(choice)
        if "error" in choice:
            raise ValueError(choice["error"])
        return choice["name"]

    def _broadcast(self, obj):
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def _reset_window(self) -> None:
        self.win = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0,
                    "loss": torch.zeros((), device=self.device),
                    "bad": torch.zeros((), device=self.device),         # steps skipped as non-finite
                    "first_bad": torch.zeros((), device=self.device),   # the first of them (0: none)
                    "device_skips": 0, "device_decode_s": 0.0}          # data.decode=gpu: skips, decode time

    def say(self, msg: str) -> None:
        if self.rank == 0:
            say(msg)

    # ------------------------------------------------------------------ resume
    def resume(self) -> None:
        """Continue from the newest complete checkpoint, chosen once by rank 0 for every rank, read
        by each rank straight from storage; else start fresh (optionally from ``init_from``)."""
        choice = None
        if self.rank == 0:  # the index is read once per attempt, here
            self.finalizer = ckpt.Finalizer(self.run, self.cfg.train.keep_last, self.cfg.train.best_metric)
            latest = self.finalizer.latest()
            if latest:
                choice = {"uri": latest["uri"], "state": ckpt.read_train_state(self.run.child(latest["name"]))}
        choice = self._broadcast(choice)
        if choice:
            st = choice["state"]
            if st.get("global_batch", self.global_batch) != self.global_batch:  # the driver adapts accum; guard
                raise RuntimeError(f"resume: global batch {self.global_batch} != saved {st['global_batch']}")
            same_world = st.get("world_size") == self.world
            restored = ckpt.load_into(self.model, self.opt, Store(choice["uri"]), rank=self.rank,
                                      restore_rng=same_world)
            self.step = st["step"]
            self.saved_metrics = st.get("metrics") or {}
            if not restored:  # another world size: fresh, distinct per-rank masking streams
                torch.manual_seed(masking_seed(self.cfg.train.seed, self.rank, self.step))
            self.say(f"[mae] resumed from {choice['uri']} at step {self.step} ({self.step * self.global_batch} images) "
                     f"with {self.world} workers (saved by {st['world_size']})")
        else:
            torch.manual_seed(masking_seed(self.cfg.train.seed, self.rank, 0))
            if self.cfg.model.init_from:
                self._init_from(self.cfg.model.init_from)
        if self.rank == 0:
            self.logger.keep_until(self.step)  # the log continues from the checkpoint too
        # The data continues where the chosen checkpoint's images end, also when this is a
        # restarted worker group whose stream was built by the driver for an earlier position.
        if self.rank == 0:
            item, row = self.stream.locate(self.step * self.global_batch)
            import ray
            ray.get(self.plan["stats_actor"].set_resume.remote(str(self.run), item, row))
        dist.barrier(group=self.cpu_group)

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
        t0, wait0 = time.perf_counter(), self.win["wait"]
        batch = next(self.batches, None)
        self.win["wait"] += time.perf_counter() - t0
        # Every rank gets the same number of batches: streaming_split(equal=True)'s OutputSplitter
        # gives each split exactly the same number of rows (it truncates the rest) and the
        # iterator drops the last partial batch, so no per-step agreement on the end is needed.
        if batch is None:
            raise DataExhausted(f"the data stream ended at step {self.step} of {self.total}: more images were "
                                "skipped as corrupt than the plan's spare epoch covers; see the skip counts")
        if self.cfg.data.decode == "gpu":  # JPEG bytes + crop boxes: decoded here, on the device
            from pipeline.gpu_decode import decode_on_device
            x, _, skipped = decode_on_device(batch["image"], batch["box"], batch["flip"], img_size=self.cfg.data.img_size,
                                             patch_size=self.cfg.data.patch_size, device=self.device)
            self.win["device_skips"] += skipped
            self.win["device_decode_s"] += time.perf_counter() - t0 - (self.win["wait"] - wait0)
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
        for micro, x in enumerate(patches):
            set_gradient_sync(self.model, micro == self.accum - 1)
            with self.autocast:
                loss, _, _ = self.model(x)
            (loss / self.accum).backward()
            self.win["loss"] += loss.detach() / self.accum
        self.lr = lr_at(self.step, peak=self.peak, warmup=self.warmup, total=self.total, min_lr=self.cfg.optim.min_lr)
        for g in self.opt.param_groups:
            g["lr"] = self.lr
        # Every step is checked on the device before it is applied; the log step reads the flags.
        bad = guarded_step(self.opt, self.model.parameters(), self.cfg.optim.clip_grad)
        self.win["bad"] += bad
        self.win["first_bad"] = torch.where((self.win["first_bad"] == 0) & (bad > 0),
                                            float(self.step + 1), self.win["first_bad"])
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.win["steps"] += 1

    def metrics(self) -> dict:
        """The window since the last call, averaged over ranks (one small all-reduce)."""
        elapsed = time.perf_counter() - self.win["t0"]
        bad, first_bad = int(self.win["bad"]), int(self.win["first_bad"])  # the same on every rank
        t = torch.tensor([float(self.win["loss"]), self.win["wait"]], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        loss_sum, wait_sum = t.tolist()
        steps = max(1, self.win["steps"])
        ips = self.win["steps"] * self.global_batch / max(elapsed, 1e-9)
        m = {"loss": loss_sum / self.world / steps, "lr": self.lr, "step": self.step,
             "epoch": self.step * self.global_batch / self.stream.rows_per_epoch,
             "images_seen": self.step * self.global_batch,
             "throughput/images_per_s": ips,
             "throughput/data_wait_share": wait_sum / self.world / max(elapsed, 1e-9),
             "mfu": ips * self.plan["flops_per_image"] / (self.peak_fl * self.world),
             "memory/peak_mb": peak_memory_mb(self.device),
             "memory/param_optim_mb": local_state_mb(self.model, self.opt),
             "_skipped": bad, "_first_bad": first_bad,
             **({"data/device_decode_skips": self.win["device_skips"],
                 "throughput/device_decode_share": self.win["device_decode_s"] / max(elapsed, 1e-9)}
                if self.cfg.data.decode == "gpu" else {}),
             "_eta_s": (self.total - self.step) * elapsed / steps}
        if self.ckpt_stall is not None:  # the last save's time on the training path
            m["time/checkpoint_stall_s"], self.ckpt_stall = self.ckpt_stall, None
        if not self.first_log_done:
            m["time/launch_to_first_log_s"] = time.time() - self.plan["t_launch"]
            self.first_log_done = True
        self._reset_window()
        return m

    def check_finite(self, m: dict) -> bool:
        """The window's steps were all finite; else the run stops here, before any checkpoint (the
        non-finite steps were never applied: the weights are those of the last good step)."""
        if math.isfinite(m["loss"]) and not m["_skipped"]:
            return True
        at = m["_first_bad"] or self.step
        msg = (f"non-finite loss or gradients at step {at} (window loss {m['loss']:.4g}), lr {self.lr:.3g}: the update "
               "was not applied and no checkpoint written; "
               "try a lower optim.base_lr, optim.clip_grad=1.0, a longer warmup, or fp32 "
               "(train.precision=fp32); resume restarts from the last good checkpoint")
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
        knn = f" knn {100 * m['knn_top1']:.1f}%" if "knn_top1" in m else ""
        self.logger.log(self.step, {k: v for k, v in m.items() if not k.startswith("_")}, line=(
            f"[mae] step {self.step}/{self.total} epoch {m['epoch']:.2f} loss {m['loss']:.4f}{knn} lr {self.lr:.2e} "
            f"{m['throughput/images_per_s']:.1f} img/s data-wait {100 * m['throughput/data_wait_share']:.0f}% "
            f"mfu {100 * m['mfu']:.1f}% ({self.peak_how}) mem {m['memory/peak_mb']:.0f}MB eta {fmt_eta(m['_eta_s'])}"))

    def report_due(self) -> bool:
        """Rank 0 decides for all ranks whether a metrics-only report is due: by its clock, and not
        while a checkpoint is still uploading (Ray queues a worker's reports in order, so a report
        made then would hold the loop until the upload is in)."""
        due = (time.monotonic() - self.last_report >= self.cfg.train.min_report_interval_s
               and (self.saving is None or self.saving.done()))
        return bool(self._broadcast(due))

    def report(self, m: dict, checkpoint=None, name: str | None = None, upload_mode=None, upload_fn=None) -> None:
        import ray.train
        public = {k: v for k, v in m.items() if not k.startswith("_")}
        if checkpoint is None:
            ray.train.report(public)
        else:
            ray.train.report({**public, "checkpoint_step": self.step}, checkpoint=checkpoint, checkpoint_dir_name=name,
                             checkpoint_upload_mode=upload_mode, checkpoint_upload_fn=upload_fn,
                             delete_local_checkpoint_after_upload=False)  # upload_fn removes it
        self.last_report = time.monotonic()

    def checkpoint(self, m: dict) -> None:
        """Collective: every rank writes its shard to the node's disk and hands it to Ray Train's
        upload (in the background with ``train.async_checkpoint``); the loop goes on. Completion is
        ``_upload``'s: rank 0 marks the checkpoint complete once every rank's upload is in."""
        import ray.train
        from ray.train import CheckpointUploadMode
        name = ckpt.ckpt_name(self.step)
        local = tempfile.mkdtemp(prefix="mae-ckpt-", dir=self.scratch)
        t0 = time.perf_counter()
        state = {"step": self.step, "images_seen": self.step * self.global_batch,
                 "epoch": self.step * self.global_batch // self.stream.rows_per_epoch,
                 "metrics": {k: v for k, v in m.items() if not k.startswith("_")}, "world_size": self.world,
                 "global_batch": self.global_batch, "accum_steps": self.accum, "strategy": self.strategy,
                 "time": time.time()}
        entry = None
        self.wait_saved()  # rank 0: the previous save is complete (marker, index, pruning) before this one starts
        if self.rank == 0:
            # A directory of this name from an attempt that died after its marker is no longer
            # complete once new files start landing in it.
            self.run.rm([f"{name}/{ckpt.MARKER}"])
            self.logger.sync()  # before the marker: a complete checkpoint implies its metrics are stored
            entry = {"name": name, "step": self.step, "complete": True, "metrics": state["metrics"],
                     "time": state["time"]}
        self.saving = Future()
        ckpt.write_local(self.model, self.opt, local, rank=self.rank, train_state=state,
                         config_yaml=self.plan["config_yaml"])
        background = self.cfg.train.async_checkpoint
        self.report(m, checkpoint=ray.train.Checkpoint.from_directory(local), name=name,
                    upload_mode=CheckpointUploadMode.ASYNC if background else CheckpointUploadMode.SYNC,
                    upload_fn=functools.partial(self._upload, local=local, step=self.step, entry=entry,
                                                 done=self.saving))
        self.ckpt_stall = time.perf_counter() - t0
        if self.rank == 0:
            say(f"[mae] checkpoint {name} written, uploading{' in the background' if background else ''} "
                f"({self.ckpt_stall:.2f}s on the training path)")

    def _upload(self, checkpoint, dir_name: str, *, local: str, step: int, entry: dict | None, done: Future):
        """Ray Train's upload of this rank's files (its upload thread with ``async_checkpoint``),
        then: this rank's file list to rank 0, whose finalizer completes the checkpoint.

        Runs exactly once per save on every rank (the gather below must pair up across ranks), so
        nothing raised here may look retryable to Ray's own retry of a checkpoint upload: transient
        storage errors are retried here, before the gather."""
        try:
            files = ckpt.file_manifest(local)  # hashed here, off the training path
            t = self.cfg.train
            if t.crash_in_upload and t.crash_at_step == step and not self.run.exists("crash_injected"):
                self._kill_victim(f"uploading checkpoint {step}")  # testing aid: its shard never lands
            persisted = self._persist(checkpoint, dir_name)
            # removed here, not by Ray after this returns: the end of the attempt (which waits for
            # ``done``) removes the whole scratch directory, and the two deletes raced
            shutil.rmtree(local, ignore_errors=True)
            gathered = [None] * self.world if self.rank == 0 else None
            if self.upload_group is None:
                gathered = [(step, files)]
            else:  # returns on rank 0 once every rank's upload is in storage
                dist.gather_object((step, files), gathered, dst=0, group=self.upload_group)
            if self.rank == 0:
                steps = {s for s, _ in gathered}
                if steps != {step}:  # never a marker over another save's files
                    raise RuntimeError(f"checkpoint {dir_name}: the ranks' uploads are of steps {sorted(steps)}")
                self.finalizer.complete(entry, [f for _, f in gathered], self.world)
        except BaseException as e:
            if not done.done():
                done.set_exception(e)
            if "AWS Error" in str(e):  # Ray's retry matches these: it must never run this twice
                raise RuntimeError(f"checkpoint {dir_name}: rank {self.rank}'s upload failed ({type(e).__name__})") from e
            raise
        if not done.done():
            done.set_result(None)
        return persisted

    def _persist(self, checkpoint, dir_name: str, tries: int = 3):
        """This rank's files into the run directory (Ray's copy), transient errors retried with
        backoff; a final failure is raised as an error Ray will not retry (see ``_upload``)."""
        for i in range(tries):
            try:
                return self.storage.persist_current_checkpoint(checkpoint, dir_name)
            except Exception as e:  # noqa: BLE001 - re-raised below, once the tries are spent
                if i == tries - 1 or self.aborted:
                    raise RuntimeError(f"checkpoint {dir_name}: the upload of rank {self.rank}'s shard failed "
                                       f"{i + 1} times ({type(e).__name__}); the run resumes from the last "
                                       "complete checkpoint") from e
                time.sleep(2 ** i)

    def wait_saved(self) -> None:
        """This rank's last upload is in storage (rank 0: the checkpoint is complete), or its error
        is raised here. Every save has exactly one upload, in order (one upload thread per worker)."""
        if self.saving is not None:
            saving, self.saving = self.saving, None
            saving.result()

    def picture(self) -> None:
        if not self.vis:
            return
        patches = torch.from_numpy(np.asarray(self.vis["patches"], dtype=np.uint8)).to(self.device)
        noise = torch.from_numpy(np.asarray(self.vis["noise"], dtype=np.float32)).to(self.device)
        self.model.eval()
        img = reconstruction_grid(self.model if self.strategy != "ddp" else self.core, patches, noise)
        self.model.train()
        if self.rank == 0:
            path = os.path.join(self.scratch, f"reconstruction_{self.step:08d}.png")
            save_png(img, path)
            self.logger.put_file(path, f"pictures/reconstruction_{self.step:08d}.png")
            self.logger.put_file(path, "reconstruction_latest.png")

    def _crash_once(self) -> None:
        """Testing aid: SIGKILL rank 1 once at ``train.crash_at_step``, after the last save is complete
        on every rank (so the restart point is known: that checkpoint)."""
        if self.step != self.cfg.train.crash_at_step or self.run.exists("crash_injected"):
            return
        self.wait_saved()
        dist.barrier(group=self.cpu_group)
        self._kill_victim(f"at step {self.step}")

    def _kill_victim(self, when: str) -> None:
        if self.rank == min(1, self.world - 1):
            self.run.write("crash_injected", b"1")
            say(f"[mae] testing aid: SIGKILL rank {self.rank} (pid {os.getpid()}) {when}")
            os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> None:
        import ray.train
        t = self.cfg.train
        self.resume()
        if self.step >= self.total:
            # The driver found the run unfinished, the index now says finished (another attempt's
            # last checkpoint completed in between; a finished run relaunched normally never gets
            # here: see launch.finished_result). Nothing to train; the caller still needs the result.
            self.say(f"[mae] the run already reached step {self.total}; reporting its final metrics")
            self.report(dict(self.saved_metrics, step=self.step))
            return
        shard = ray.train.get_dataset_shard("train")
        kw = iter_kwargs(self.cfg.data, t.batch_size, self.rank)
        self.batches = iter(shard.iter_batches(batch_format="numpy", **kw) if self.cfg.data.decode == "gpu"
                            else shard.iter_torch_batches(**kw))
        self.model.train()
        start = self.step
        while self.step < self.total:
            self.train_step()
            for hook in self.hooks:
                hook()
            last = self.step == self.total
            stop = t.stop_after_steps > 0 and self.step - start >= t.stop_after_steps
            is_ckpt = self.step % t.ckpt_every == 0 or last or stop
            is_report = t.report_every > 0 and self.step % t.report_every == 0 and not is_ckpt
            is_log = self.step % t.log_every == 0 or is_ckpt or is_report
            if not is_log:
                continue
            if is_report:
                is_report = self.report_due()
            m = self.metrics()
            if not self.check_finite(m):
                return
            if self.probe is not None and (is_report or is_ckpt):
                self.knn(m)
            self.log(m)
            if self.step % self.vis_every == 0 or last or stop:
                self.picture()
            if is_ckpt:
                self.checkpoint(m)
            elif is_report:
                self.report(m)
            if stop:
                break

    def close(self, ok: bool) -> None:
        """End of the attempt: the last metrics go up (after a clean end only: a failing attempt must
        not hide its error behind a second one) and the scratch directory goes."""
        try:
            if ok:
                self.wait_saved()  # the upload reads the scratch dir; rank 0: the last checkpoint is complete
            if self.rank == 0 and ok:
                self.logger.sync()
        finally:
            if self.logger is not None:
                self.logger.close()
            if self.saving is None or self.saving.done():
                shutil.rmtree(self.scratch, ignore_errors=True)
            else:
                # An upload still copies from here: deleting under it could land part of a shard
                # (and a marker over it). Left to the next attempt's cleanup of dead owners' dirs.
                self.aborted = True

