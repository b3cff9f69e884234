"""The Ray Train worker loop: FSDP2 MAE, AdamW with warmup + cosine, DCP checkpoints.

Runs in every Train worker. Its only contact with the data is
``get_dataset_shard("train").iter_torch_batches(...)``; every Ray Data setting lives in
``pipeline.dataset``. ``ray.train.report`` is a barrier in Train V2: every rank calls it at the
same steps (log steps without a checkpoint, checkpoint steps with one).
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from jobs.core import checkpoint as ckpt
from jobs.core.config import PretrainConfig
from jobs.core.metrics import (
    MetricsLogger,
    fmt_eta,
    local_state_mb,
    peak_flops,
    peak_memory_mb,
)
from jobs.core.optim import build_optimizer, lr_at
from jobs.core.probe import features, knn_top1
from jobs.core.visualize import reconstruction_grid, save_png
from mae_model import MaskedAutoencoder
from mae_model.parallelize import mixed_precision, parallelize
from pipeline.dataset import iter_kwargs
from pipeline.storage import parse_uri, write_bytes

warnings.filterwarnings("ignore", message=".*DTensor random operators.*")


class NonFiniteLoss(RuntimeError):
    pass


def _all_min(x: float, group) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return float(t.item())


def _all_sum(values: list[float], device, group=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def build_model(cfg: PretrainConfig, device: torch.device, mesh, precision: str, rank: int):
    """Meta-device model -> FSDP2 -> materialized on ``device`` -> initialized."""
    mcfg = cfg.model.build()
    with torch.device("meta"):
        model = MaskedAutoencoder(mcfg)
    parallelize(model, mesh, mp_policy=mixed_precision("bf16" if precision == "bf16" else None),
                activation_checkpointing=cfg.model.activation_checkpointing,
                reshard_after_forward=cfg.train.reshard_after_forward)
    model.to_empty(device=device)
    # Per-rank seed: each rank initializes its own shard (on CUDA, DTensor's RNG tracker makes
    # the sharded init match an unsharded one; on CPU the shards are independent draws).
    torch.manual_seed(cfg.train.seed * 1000 + rank)
    model.init_weights()
    return model


def _init_from(model, uri: str, rank: int) -> None:
    """Start from weights (``model.init_from``): an official MAE .pth, an export, or one of our
    checkpoints; every rank loads the full CPU copy and keeps its own shard of it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
    )

    from jobs.core.weights import init_state_dict
    sd = init_state_dict(uri, model.config, verbose=(rank == 0))
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=False))
    if rank == 0:
        print(f"[mae] init_from {uri}: loaded {len(sd)} tensors", flush=True)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from torch.distributed.device_mesh import init_device_mesh

    cfg = PretrainConfig.from_dict(config["cfg"])
    plan = config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    precision = plan["precision"]
    mesh = init_device_mesh(device.type, (world,))
    # End-of-data agreement on a CPU group: no GPU sync per step.
    flag_group = dist.new_group(backend="gloo") if device.type == "cuda" else None
    t_launch = plan["t_launch"]

    model = build_model(cfg, device, mesh, precision, rank)
    opt = build_optimizer(model, lr=plan["peak_lr"], weight_decay=cfg.optim.weight_decay,
                          betas=cfg.optim.betas, device_type=device.type)
    total, warmup, peak = plan["total_steps"], plan["warmup_steps"], plan["peak_lr"]
    accum, B = cfg.optim.accum_steps, cfg.train.batch_size
    run_dir = plan["run_dir"]

    # ---------------------------------------------------------------- resume or start
    # Looked up here, not on the driver: after a worker failure Ray Train restarts this
    # function, which must continue from the newest *complete* checkpoint.
    step, epoch, batch_in_epoch = 0, 0, 0
    latest = ckpt.latest_complete(run_dir)
    if latest:
        st = ckpt.read_train_state(latest["uri"])
        local = ckpt.download(latest["uri"])
        ckpt.load_into(model, opt, local, rank=rank)
        step, epoch, batch_in_epoch = st["step"], st["epoch"], st["batch_in_epoch"]
        ckpt.cleanup_local(local)
        if rank == 0:
            print(f"[mae] resumed from {latest['uri']} at step {step} (epoch {epoch}, "
                  f"batch {batch_in_epoch}) with {world} workers (saved by {st['world_size']})", flush=True)
    else:
        torch.manual_seed(cfg.train.seed * 1000 + 17 * rank + 1)  # masking noise stream per rank
        if cfg.model.init_from:
            _init_from(model, cfg.model.init_from, rank)

    logger = None
    scratch = tempfile.mkdtemp(prefix="mae-run-")
    if rank == 0:
        logger = MetricsLogger(os.path.join(scratch, "run"), run_dir, total)
    peak_fl, peak_how = peak_flops(device, precision)
    flops_per_img = plan["flops_per_image"]
    vis = plan.get("vis")
    vis_patches = torch.from_numpy(np.asarray(vis["patches"], dtype=np.uint8)).to(device) if vis else None
    vis_noise = torch.from_numpy(np.asarray(vis["noise"], dtype=np.float32)).to(device) if vis else None
    probe = plan.get("probe")
    if probe:
        probe = {k: torch.from_numpy(np.asarray(v)) for k, v in probe.items()}
    vis_every = cfg.train.vis_every or cfg.train.ckpt_every

    shard = ray.train.get_dataset_shard("train")
    model.train()
    attempt_start_step = step
    first_step_logged = False
    win = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0, "loss": torch.zeros((), device=device)}

    def report(metrics: dict, with_ckpt: bool) -> None:
        nonlocal win
        if not with_ckpt:
            ray.train.report(metrics)
            return
        state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "metrics": metrics,
                 "world_size": world, "global_batch": plan["global_batch"], "time": time.time()}
        local = tempfile.mkdtemp(prefix="mae-ckpt-")
        t0 = time.perf_counter()
        ckpt.write_local(model, opt, local, rank=rank, train_state=state, config_yaml=plan["config_yaml"])
        name = ckpt.ckpt_name(step)
        ray.train.report({**metrics, "checkpoint_step": step},
                         checkpoint=ray.train.Checkpoint.from_directory(local), checkpoint_dir_name=name)
        dist.barrier()  # every rank's upload has finished
        if rank == 0:
            uri = str(parse_uri(run_dir).join(name))
            logger.sync()  # before the marker: a complete checkpoint implies its metrics are stored
            man = ckpt.finalize(uri, world)
            removed = ckpt.update_index_and_prune(
                run_dir, {"name": name, "step": step, "uri": uri, "complete": True, "metrics": metrics,
                          "bytes": man["total_bytes"], "time": time.time()},
                cfg.train.keep_last, cfg.train.best_metric)
            print(f"[mae] checkpoint {uri} ({man['total_bytes'] / 2**20:.1f} MiB, "
                  f"{time.perf_counter() - t0:.1f}s){' removed ' + ', '.join(removed) if removed else ''}",
                  flush=True)
        ckpt.cleanup_local(local)
        dist.barrier()

    def picture() -> None:
        if vis_patches is None:
            return
        model.eval()
        img = reconstruction_grid(model, vis_patches, vis_noise)
        model.train()
        if rank == 0:
            path = os.path.join(scratch, f"reconstruction_{step:08d}.png")
            save_png(img, path)
            logger.put_file(path, f"pictures/reconstruction_{step:08d}.png")
            logger.put_file(path, "reconstruction_latest.png")

    stop = False
    while step < total and not stop:
        steps_at_epoch_start = step
        it = iter(shard.iter_torch_batches(**iter_kwargs(cfg.data, B, epoch)))
        for _ in range(batch_in_epoch):  # resume inside an epoch: skip what was consumed
            if next(it, None) is None:
                break
        end_of_epoch = False
        while step < total:
            for micro in range(accum):
                t0 = time.perf_counter()
                batch = next(it, None)
                win["wait"] += time.perf_counter() - t0
                # All ranks agree on the end of data, so that collectives stay matched.
                if _all_min(0.0 if batch is None else 1.0, flag_group) == 0.0:
                    end_of_epoch = True
                    break
                patches = batch["patches"].to(device, non_blocking=True)
                model.set_requires_gradient_sync(micro == accum - 1)
                loss, _, _ = model(patches)
                (loss / accum).backward()
                win["loss"] += loss.detach() / accum
                batch_in_epoch += 1
            if end_of_epoch:
                opt.zero_grad(set_to_none=True)  # a partial accumulation is dropped
                break
            lr = lr_at(step, peak=peak, warmup=warmup, total=total, min_lr=cfg.optim.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            if cfg.optim.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            win["steps"] += 1

            if cfg.train.crash_at_step == step and rank == min(1, world - 1):
                marker = parse_uri(run_dir).join("crash_injected")
                from pipeline.storage import exists
                if not exists(marker):
                    write_bytes(marker, b"1")
                    print(f"[mae] testing aid: SIGKILL rank {rank} (pid {os.getpid()}) at step {step}", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)

            is_log = step % cfg.train.log_every == 0 or step == total
            is_ckpt = step % cfg.train.ckpt_every == 0 or step == total
            is_stop = cfg.train.stop_after_steps > 0 and step - attempt_start_step >= cfg.train.stop_after_steps
            is_vis = step % vis_every == 0 or step == total or is_stop
            if not (is_log or is_ckpt or is_stop):
                continue
            elapsed = time.perf_counter() - win["t0"]
            loss_sum, wait_sum = _all_sum([float(win["loss"]), win["wait"]], device)
            mean_loss = loss_sum / world / max(1, win["steps"])
            if not math.isfinite(mean_loss):
                msg = (f"non-finite loss ({mean_loss}) at step {step}, lr {lr:.3g}: no checkpoint written; "
                       "try a lower optim.base_lr, optim.clip_grad=1.0, a longer warmup, or fp32 "
                       "(train.precision=fp32); resume restarts from the last good checkpoint")
                if rank == 0:
                    write_bytes(parse_uri(run_dir).join("FAILED.json"),
                                json.dumps({"error": msg, "step": step}).encode())
                    print(f"[mae] {msg}", flush=True)
                # The objective is reported as worthless (0), so that a Tune scheduler counts the
                # diverged trial instead of rejecting a result without its metric.
                ray.train.report({"error": msg, "step": step, "loss": float("nan"), "knn_top1": 0.0,
                                  "images_seen": step * plan["global_batch"]})
                return
            imgs = win["steps"] * plan["global_batch"]
            ips = imgs / max(elapsed, 1e-9)
            metrics = {
                "loss": mean_loss, "lr": lr, "epoch": epoch, "step": step,
                "throughput/images_per_s": ips,
                "throughput/data_wait_share": wait_sum / world / max(elapsed, 1e-9),
                "mfu": ips * flops_per_img / (peak_fl * world),
                "memory/peak_mb": peak_memory_mb(device),
                "memory/param_optim_mb": local_state_mb(model, opt),
                "images_seen": step * plan["global_batch"],
            }
            if probe is not None:  # every rank runs the (collective) forward; all get the result
                ftr = features(model, probe["train"].to(device))
                fva = features(model, probe["val"].to(device))
                for kind in ("cls", "mean"):
                    metrics[f"knn_top1/{kind}"] = knn_top1(ftr[kind], probe["train_y"], fva[kind], probe["val_y"])
                metrics["knn_top1"] = max(metrics["knn_top1/cls"], metrics["knn_top1/mean"])
            if not first_step_logged:
                metrics["time/launch_to_first_log_s"] = time.time() - t_launch
                first_step_logged = True
            if rank == 0:
                eta = (total - step) * elapsed / max(1, win["steps"])
                knn = f" knn {100 * metrics['knn_top1']:.1f}%" if "knn_top1" in metrics else ""
                logger.log(step, metrics, line=(
                    f"[mae] step {step}/{total} epoch {epoch} loss {mean_loss:.4f}{knn} lr {lr:.2e} "
                    f"{ips:.1f} img/s data-wait {100 * metrics['throughput/data_wait_share']:.0f}% "
                    f"mfu {100 * metrics['mfu']:.1f}% ({peak_how}) mem {metrics['memory/peak_mb']:.0f}MB "
                    f"eta {fmt_eta(eta)}"))
            if is_vis:
                picture()
            report(metrics, with_ckpt=is_ckpt or is_stop)
            win = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0, "loss": torch.zeros((), device=device)}
            if is_stop:
                stop = True
                break
        if end_of_epoch:
            if step == steps_at_epoch_start and batch_in_epoch == 0:
                raise RuntimeError(f"epoch {epoch} gave no full batch of {plan['global_batch']} images: "
                                   "the dataset is smaller than the global batch; lower train.batch_size")
            epoch += 1
            batch_in_epoch = 0
    if rank == 0:
        logger.sync()
        logger.close()
