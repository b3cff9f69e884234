"""A worker's model: the strategy agreed by every rank, the model built on the meta device,
parallelized by that strategy, materialized and initialized."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from jobs.core.common import say
from jobs.core.config import PretrainConfig
from mae_model import MaskedAutoencoder
from mae_model.parallelize import choose_strategy, compile_blocks, mixed_precision, parallelize, replicate


def device_bytes(device: torch.device, local_world: int) -> int:
    """Memory one worker may plan with: its GPU's, or its share of the host's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local_world)


def build_model(cfg: PretrainConfig, device: torch.device, strategy: str, precision: str, rank: int,
                world: int, local_world: int, make=None):
    """Meta-device model -> parallelized by ``strategy`` -> materialized on ``device`` -> initialized.

    fsdp / hsdp: sharded before materializing (no rank ever holds the whole unsharded model);
    hsdp's mesh is (nodes, workers per node): shard within a node, replicate across nodes.
    ddp: materialized whole and wrapped (rank 0's weights are broadcast); one worker: plain.
    ``make``: builds the module (default: the MAE of ``cfg.model``; fine-tuning: the classifier).
    """
    from torch.distributed.device_mesh import init_device_mesh
    make = make or (lambda: MaskedAutoencoder(cfg.model.build()))
    with torch.device("meta"):
        model = make()
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


def agree_strategy(cfg: PretrainConfig, device: torch.device, *, rank: int, world: int, node_rank: int,
                   local_rank: int, local_world: int, group=None, make=None) -> str:
    """Rank 0 picks the strategy (scaling.strategy, or auto by model size and device memory) and
    says why; every rank gets it. hsdp needs the same number of workers on every node, ranks
    grouped by node."""
    layout = [None] * world
    dist.all_gather_object(layout, (node_rank, local_rank, local_world), group=group)
    choice = None
    if rank == 0:
        with torch.device("meta"):
            model = make() if make else MaskedAutoencoder(cfg.model.build())
            n_params = sum(p.numel() for p in model.parameters())
        name, why = choose_strategy(cfg.scaling.strategy, n_params=n_params,
                                    device_bytes=device_bytes(device, local_world), world=world,
                                    local_world=local_world)
        grouped = all(r == n * lw + lr and lw == local_world for r, (n, lr, lw) in enumerate(layout))
        if name == "hsdp" and not grouped:
            choice = {"error": "scaling.strategy=hsdp needs the same number of workers on every node (got "
                      f"{sorted(lw for _, lr, lw in layout if lr == 0)} per node): use "
                      "scaling.placement_strategy=STRICT_PACK per node group, or scaling.strategy=fsdp"}
        else:
            choice = {"name": name, "why": why}
            say(f"[mae] strategy {name}: {why}")
    box = [choice]
    dist.broadcast_object_list(box, src=0, group=group)
    if "error" in box[0]:
        raise ValueError(box[0]["error"])
    return box[0]["name"]
