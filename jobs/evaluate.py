"""mae evaluate CHECKPOINT DATASET: frozen-encoder k-NN and linear probe.

CHECKPOINT: a checkpoint directory of this project, or a run directory (its latest complete
checkpoint). DATASET: labeled prepared shards (train split = memory / probe training set, val
split = scoring) or a labeled image folder (split by a seeded hash, --val-fraction). Features are
extracted in parallel on the Ray cluster; results are printed and written beside the checkpoint
as evaluation.json.

    mae evaluate s3://bucket/runs/mae-vit-b s3://bucket/imagenet-shards --max-train 50000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import TYPE_CHECKING

import numpy as np

from jobs.core import weights as ckpt_tools
from jobs.core.common import UserError, init_ray, one_line_errors, parse_args
from pipeline.cluster import check_visible_to_cluster
from pipeline.storage import parse_uri, read_bytes, write_bytes

if TYPE_CHECKING:  # torch and the model are imported where used: checking a command line needs neither
    import torch

    from mae_model import MaskedAutoencoder


def model_config_of(ckpt_uri: str):
    return ckpt_tools.model_config_from_yaml(read_bytes(parse_uri(ckpt_uri).join("config.yaml")))


def load_model(ckpt_uri: str, random_init: bool = False, seed: int = 0) -> MaskedAutoencoder:
    """The full model on CPU in one process (DCP shards consolidated, no process group), or the
    same architecture at random initialization (seeded)."""
    import torch

    from mae_model import MaskedAutoencoder
    if random_init:
        torch.manual_seed(seed)
        return MaskedAutoencoder(model_config_of(ckpt_uri))
    with tempfile.TemporaryDirectory(prefix="mae-eval-") as tmp:
        return ckpt_tools.consolidate(ckpt_tools.local_checkpoint(ckpt_uri, tmp), source=ckpt_uri)


class _Features:
    """A Ray Data actor: the frozen encoders (the checkpoint's, and the same one at random init
    when a baseline is asked for), loaded once per actor; uint8 patches -> every encoder's features."""

    def __init__(self, cfg_dict: dict, state_refs: dict):
        import ray
        import torch

        from mae_model import MAEConfig, MaskedAutoencoder
        torch.set_num_threads(1)
        self.models = {}
        for name, ref in state_refs.items():
            m = MaskedAutoencoder(MAEConfig.from_dict(cfg_dict))
            m.load_state_dict(ray.get(ref[0]))
            self.models[name] = m.eval()

    def __call__(self, batch: dict) -> dict:
        import torch
        x = torch.from_numpy(np.ascontiguousarray(batch["patches"]))
        out = {k: batch[k] for k in ("label", "split") if k in batch}
        with torch.no_grad():
            for name, m in self.models.items():
                f = m.forward_features(x)
                out[f"{name}/cls"], out[f"{name}/mean"] = f["cls"].numpy(), f["mean"].numpy()
        return out


def feature_actors(requested: int, cluster_cpus: float) -> int:
    """Feature actors that leave a CPU for the decode tasks feeding them (1 CPU each): with every
    CPU held by an actor, no decode task starts and the job waits forever. One line if none fits."""
    fit = int(cluster_cpus - 1 + 1e-9)
    if fit < 1:
        raise UserError(f"mae evaluate: the Ray cluster has {cluster_cpus:g} CPUs; one feature actor and one "
                        "decode task need 2: add CPUs (a local Ray: more logical CPUs)")
    return max(1, min(requested, fit))


def _embed(ds, models: dict[str, MaskedAutoencoder], workers: int):
    """ds of uint8 patches -> the same rows with every model's features, computed by feature
    actors on the cluster (each loads the encoders once; weights passed by reference)."""
    import ray

    from jobs.core.common import cluster_capacity
    refs = {name: [ray.put({k: v.cpu() for k, v in m.state_dict().items()})] for name, m in models.items()}
    cfg = next(iter(models.values())).config
    return ds.map_batches(_Features, fn_constructor_kwargs={"cfg_dict": cfg.to_dict(), "state_refs": refs},
                          batch_size=64, concurrency=feature_actors(workers, cluster_capacity().get("CPU", 0.0)),
                          num_cpus=1, batch_format="numpy")


def features_dataset(models: dict[str, MaskedAutoencoder], source: str, limits: dict[str, int | None],
                     workers: int, val_fraction: float, seed: int):
    """The Ray Data pass of :func:`extract`: every split's center crops, each row tagged with its
    split inside its decode task, then one pool of feature actors for all splits."""
    from pipeline.config import DataConfig
    from pipeline.dataset import build_dataset, decode_task_args, with_column
    c = next(iter(models.values())).config
    parts_ds = []
    for split, limit in limits.items():
        dcfg = DataConfig(source=source, split=split, img_size=c.img_size, patch_size=c.patch_size, augment=False,
                          shuffle=False, val_fraction=val_fraction, seed=seed, decode_batch_size=64,
                          progress_bars=sys.stdout.isatty())
        ds, info, _ = build_dataset(dcfg)
        if not info.labeled and info.kind == "images":
            raise UserError(f"{source}: no labels (use the class_name/file.jpg layout or prepared shards with classes)")
        # The decode task's own resources and pool, so that Ray Data fuses the tag into it: as a map
        # of its own (a sliver of CPU, a function of this module, which then imported torch) it ran
        # as extra tasks on worker processes of their own; the digits' feature pass took 56 s so,
        # 37 s fused
        ds = ds.map_batches(with_column, fn_kwargs={"name": "split", "value": split}, batch_format="numpy",
                            **decode_task_args(dcfg))
        parts_ds.append(ds.limit(limit) if limit else ds)
    ds = parts_ds[0].union(*parts_ds[1:]) if len(parts_ds) > 1 else parts_ds[0]
    return _embed(ds, models, workers)


def extract(models: dict[str, MaskedAutoencoder], source: str, limits: dict[str, int | None], workers: int,
            val_fraction: float, seed: int) -> dict[str, tuple[dict, dict, torch.Tensor]]:
    """Every split's center-crop features under every model, in one Ray Data pass (the actors load
    the encoders once for all splits). -> {split: ({model: {"cls", "mean"}}, labels)}."""
    import torch
    ds = features_dataset(models, source, limits, workers, val_fraction, seed)
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    out = {}
    for split in limits:
        mine = [{k: v[p["split"] == split] for k, v in p.items()} for p in parts]
        mine = [p for p in mine if len(p["label"])]
        if not mine:
            raise UserError(f"{source}: the {split!r} split yielded no images")
        feats = {name: {kind: torch.from_numpy(np.concatenate([p[f"{name}/{kind}"] for p in mine]))
                        for kind in ("cls", "mean")} for name in models}
        labels = torch.from_numpy(np.concatenate([p["label"] for p in mine])).long()
        if (labels < 0).any():
            raise UserError(f"{source}: {int((labels < 0).sum())} images of the {split!r} split have no label")
        out[split] = (feats, labels)
    return out


def evaluate(ckpt_uri: str, dataset: str, *, max_train: int | None = None, max_val: int | None = None,
             workers: int = 2, val_fraction: float = 0.2, seed: int = 0, random_init: bool = False,
             baseline: bool = False, linear: bool = True, write: bool = True, shared_fs: bool = False,
             linear_protocol: str = "quick", linear_epochs: int = 90, linear_warmup_epochs: int = 10,
             linear_batch: int = 256, linear_blr: float = 0.1, global_pool: bool = False) -> dict:
    """Probes of the checkpoint's frozen encoder (``random_init``: of the same encoder untrained).
    ``baseline``: both, from one feature pass; the untrained encoder's results go under
    ``"baseline"`` (and to ``evaluation_random_init.json``)."""
    if linear_protocol not in ("quick", "mae"):
        raise UserError(f"--linear-protocol {linear_protocol!r}: quick or mae")
    from jobs.core.probe import evaluate_features
    check_visible_to_cluster({"DATASET": dataset}, shared_fs=shared_fs, setting="--shared-fs")
    ckpt_uri = ckpt_tools.select(ckpt_uri)["uri"]  # a complete checkpoint, or a run's latest
    models = {"random_init" if random_init else "trained": load_model(ckpt_uri, random_init=random_init, seed=seed)}
    if baseline and not random_init:
        models["random_init"] = load_model(ckpt_uri, random_init=True, seed=seed)
    feats = extract(models, dataset, {"train": max_train, "val": max_val}, workers, val_fraction, seed)
    (tr, tr_y), (va, va_y) = feats["train"], feats["val"]
    C = int(max(tr_y.max(), va_y.max())) + 1
    results = {}
    for name, model in models.items():
        res = evaluate_features(tr[name], tr_y, va[name], va_y, num_classes=C,
                                linear=linear and linear_protocol == "quick")
        if linear and linear_protocol == "mae":
            kind = "mean" if global_pool else "cls"
            res[f"linear_mae_top1/{kind}"], res["linear_mae"] = linear_probe_mae(
                model, dataset, va[name], va_y, num_classes=C, epochs=linear_epochs,
                warmup_epochs=linear_warmup_epochs, batch_size=linear_batch, blr=linear_blr,
                global_pool=global_pool, val_fraction=val_fraction, seed=seed, workers=workers)
        out = {"checkpoint": ckpt_uri, "dataset": dataset, "random_init": name == "random_init",
               "train_images": len(tr_y), "val_images": len(va_y), "classes": C, "k": 20, "temperature": 0.07,
               "linear_protocol": linear_protocol if linear else None, **res}
        if write:
            fn = "evaluation_random_init.json" if name == "random_init" else "evaluation.json"
            write_bytes(parse_uri(ckpt_uri).join(fn), json.dumps(out, indent=1).encode())
        results[name] = out
    if write:  # beside the run's training curves, in its experiment trackers
        from jobs.core.tracking import log_evaluation
        logged = log_evaluation(ckpt_uri, results)
        if logged:
            print(f"[evaluate] logged to the run's {' and '.join(logged)} run", flush=True)
    primary = results["random_init" if random_init else "trained"]
    if baseline and not random_init:
        primary = {**primary, "baseline": results["random_init"]}
    return primary


def linear_probe_mae(model: MaskedAutoencoder, source: str, val: dict, val_y: torch.Tensor, *, num_classes: int,
                     epochs: int = 90, warmup_epochs: int = 10, batch_size: int = 256, blr: float = 0.1,
                     global_pool: bool = False, val_fraction: float = 0.2, seed: int = 0, workers: int = 2,
                     verbose: bool = True) -> tuple[float, dict]:
    """The paper's linear probe (``main_linprobe.py``): the frozen encoder's cls token (or the mean
    patch token, ``global_pool``) -> BatchNorm1d(affine=False, eps=1e-6) + Linear, LARS (trust
    0.001, momentum 0.9, no weight decay), lr = blr x batch / 256 with ``warmup_epochs`` of warmup
    then cosine per iteration, on RandomResizedCrop (scale 0.08-1) + flip views that Ray Data decodes
    and ``workers`` feature actors embed on the cluster, one stream for all epochs (the head trains
    here, on the features); scored on the center-crop ``val`` features.
    -> (top-1 on val, {"steps", "lr", "final_loss"})."""
    import torch
    import torch.nn.functional as F

    from jobs.core.probe import LARS, linear_head, probe_lr
    from pipeline.config import DataConfig
    from pipeline.dataset import build_dataset
    c = model.config
    kind = "mean" if global_pool else "cls"
    dcfg = DataConfig(source=source, split="train", img_size=c.img_size, patch_size=c.patch_size, augment=True,
                      crop_scale=[0.08, 1.0], hflip=0.5, shuffle=True, val_fraction=val_fraction, seed=seed,
                      decode_batch_size=64)
    ds, info, _ = build_dataset(dcfg, epochs=epochs)
    # The frozen encoder runs in feature actors on the cluster (the costly part at ImageNet size);
    # only the head (BatchNorm + Linear on the features) trains here.
    ds = _embed(ds, {"m": model}, workers)
    steps_per_epoch = max(1, info.num_rows // batch_size)
    head = linear_head(c.embed_dim, num_classes, seed)
    lr = blr * batch_size / 256
    opt = LARS(head.parameters(), lr=lr, weight_decay=0.0)
    step, total = 0, epochs * steps_per_epoch
    for batch in ds.iter_torch_batches(batch_size=batch_size, drop_last=True):
        if step >= total:
            break
        for g in opt.param_groups:
            g["lr"] = probe_lr(step / steps_per_epoch, lr=lr, warmup_epochs=warmup_epochs, epochs=epochs)
        loss = F.cross_entropy(head(batch[f"m/{kind}"].float()), batch["label"].long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if verbose and step % steps_per_epoch == 0 and (step // steps_per_epoch) % 10 == 0:
            print(f"[evaluate] linear probe (mae protocol) epoch {step // steps_per_epoch}/{epochs} "
                  f"loss {loss.item():.3f}", flush=True)
    head.eval()
    with torch.no_grad():
        acc = (head(val[kind]).argmax(1) == val_y).float().mean().item()
    return acc, {"steps": step, "lr": lr, "final_loss": float(loss.item()) if step else None}


def table(res: dict) -> str:
    mae = res.get("linear_protocol") == "mae"
    rows = ["feature  k-NN top-1  linear top-1" + (" (mae protocol)" if mae else " (quick)")]
    for kind in ("cls", "mean"):
        lin = res.get(f"linear_mae_top1/{kind}" if mae else f"linear_top1/{kind}")
        rows.append(f"{kind:7s}  {100 * res[f'knn_top1/{kind}']:9.1f}%  "
                    + (f"{100 * lin:11.1f}%" if lin is not None else "          -"))
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mae evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint directory or run directory (URI)")
    ap.add_argument("dataset", help="labeled prepared shards (train/val splits) or labeled image folder (URI)")
    ap.add_argument("--max-train", type=int, default=None, help="cap on memory-bank / probe-training images")
    ap.add_argument("--max-val", type=int, default=None, help="cap on scored images")
    ap.add_argument("--workers", type=int, default=2, help="parallel feature-extraction actors")
    ap.add_argument("--val-fraction", type=float, default=0.2, help="image folders: held-out share")
    ap.add_argument("--no-linear", action="store_true", help="k-NN only")
    ap.add_argument("--linear-protocol", choices=["quick", "mae"], default="quick",
                    help="quick: BatchNorm + linear, SGD on frozen center-crop features (seconds); mae: the "
                         "paper's protocol (main_linprobe.py): LARS, lr 0.1 x batch/256, warmup + cosine, "
                         "RandomResizedCrop + flip views decoded every epoch on the cluster")
    ap.add_argument("--linear-epochs", type=int, default=90, help="mae protocol: epochs (paper: 90)")
    ap.add_argument("--linear-warmup-epochs", type=int, default=10, help="mae protocol: warmup epochs (paper: 10)")
    ap.add_argument("--linear-batch", type=int, default=256, help="mae protocol: batch (paper: 16384 on 64 GPUs)")
    ap.add_argument("--linear-blr", type=float, default=0.1, help="mae protocol: base lr; lr = blr x batch / 256")
    ap.add_argument("--global-pool", action="store_true", help="mae protocol: the mean patch token, not the cls token")
    ap.add_argument("--random-init", action="store_true", help="the same encoder at random init (a baseline)")
    ap.add_argument("--baseline", action="store_true",
                    help="also score the same encoder at random init, from the same feature pass, side by side")
    ap.add_argument("--shared-fs", action="store_true",
                    help="a local DATASET is on a filesystem every node mounts (else refused on a multi-node cluster)")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    return ap


def check_values(a: argparse.Namespace) -> None:
    for name in ("workers", "linear_epochs", "linear_batch"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(a, name)}: must be >= 1")
    if not 0 <= a.val_fraction < 1:
        raise UserError(f"--val-fraction {a.val_fraction}: must be in [0, 1)")


def check(argv: list[str]) -> None:
    """What ``mae submit`` checks on the user's machine before a job exists: the arguments and
    their values (CHECKPOINT and DATASET are the cluster's to read)."""
    check_values(parse_args(parser(), argv, strict=True))


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    with one_line_errors("mae evaluate"):
        check_values(a)
        init_ray(a.address, num_cpus=a.workers + 1.02)  # a local Ray: the feature actors and a decode task
        res = evaluate(a.checkpoint, a.dataset, max_train=a.max_train, max_val=a.max_val, workers=a.workers,
                       val_fraction=a.val_fraction, random_init=a.random_init, baseline=a.baseline,
                       linear=not a.no_linear,
                       shared_fs=a.shared_fs, linear_protocol=a.linear_protocol, linear_epochs=a.linear_epochs,
                       linear_warmup_epochs=a.linear_warmup_epochs, linear_batch=a.linear_batch,
                       linear_blr=a.linear_blr, global_pool=a.global_pool)
    print(f"{res['checkpoint']} on {res['dataset']}: {res['train_images']} train / {res['val_images']} val "
          f"images, {res['classes']} classes" + (" (random init)" if a.random_init else ""))
    print(table(res))
    if "baseline" in res:
        print("the same encoder at random initialization (baseline):")
        print(table(res["baseline"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
