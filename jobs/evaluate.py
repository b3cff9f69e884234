"""mae evaluate CHECKPOINT DATASET: frozen-encoder k-NN and linear probes, or (--finetuned) the
top-1 / top-5 of a fine-tuned classifier.

CHECKPOINT: a checkpoint directory of this project, or a run directory (its latest complete
checkpoint; --finetuned: its best). DATASET: labeled prepared shards (train split = memory / probe
training set, val split = scoring) or a labeled image folder (split by a seeded hash,
--val-fraction); --val VAL_DATASET scores a separate validation set (ImageNet's official val, as
the paper). Features and predictions are computed in parallel on the Ray cluster; the paper's
linear probe (--linear-protocol mae) runs as a Ray Train job on the training workers. Results are
printed and written beside the checkpoint (evaluation.json, evaluation_finetuned.json).

    mae evaluate s3://bucket/runs/mae-vit-b s3://bucket/imagenet-train --val s3://bucket/imagenet-val
    mae evaluate s3://bucket/runs/mae-vit-b s3://bucket/imagenet-train --val s3://bucket/imagenet-val \
        --linear-protocol mae --linear-workers 32 --gpu
    mae evaluate --finetuned s3://bucket/runs/mae-vit-b-ft s3://bucket/imagenet-val
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
                     workers: int, val_fraction: float, seed: int, val: str | None = None):
    """The Ray Data pass of :func:`extract`: every split's center crops, each row tagged with its
    split inside its decode task, then one pool of feature actors for all splits."""
    from pipeline.config import DataConfig
    from pipeline.dataset import build_dataset, decode_task_args, with_column
    c = next(iter(models.values())).config
    parts_ds = []
    from jobs.core.launch import val_split_of
    for split, limit in limits.items():
        # --val DATASET: the val split's images come from that dataset (its val split, else its only one)
        src, part = (val, val_split_of(val)) if split == "val" and val else (source, split)
        dcfg = DataConfig(source=src, split=part, img_size=c.img_size, patch_size=c.patch_size, augment=False,
                          shuffle=False, val_fraction=val_fraction if src == source else 0.0, seed=seed,
                          decode_batch_size=64, progress_bars=sys.stdout.isatty())
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
            val_fraction: float, seed: int, val: str | None = None) -> dict[str, tuple[dict, dict, torch.Tensor]]:
    """Every split's center-crop features under every model, in one Ray Data pass (the actors load
    the encoders once for all splits). -> {split: ({model: {"cls", "mean"}}, labels)}."""
    import torch
    ds = features_dataset(models, source, limits, workers, val_fraction, seed, val)
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
             linear_batch: int = 16384, linear_blr: float = 0.1, global_pool: bool = False, val: str | None = None,
             linear_workers: int = 2, use_gpu: bool = False) -> dict:
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
    if val:
        check_visible_to_cluster({"--val": val}, shared_fs=shared_fs, setting="--shared-fs")
    feats = extract(models, dataset, {"train": max_train, "val": max_val}, workers, val_fraction, seed, val)
    (tr, tr_y), (va, va_y) = feats["train"], feats["val"]
    C = int(max(tr_y.max(), va_y.max())) + 1
    results = {}
    for name, model in models.items():
        res = evaluate_features(tr[name], tr_y, va[name], va_y, num_classes=C,
                                linear=linear and linear_protocol == "quick")
        if linear and linear_protocol == "mae" and name == "trained":
            kind = "mean" if global_pool else "cls"
            lp = linear_probe_mae(ckpt_uri, dataset, val=val, epochs=linear_epochs, warmup_epochs=linear_warmup_epochs,
                                  batch_size=linear_batch, blr=linear_blr, global_pool=global_pool,
                                  val_fraction=val_fraction, seed=seed, num_workers=linear_workers, use_gpu=use_gpu,
                                  shared_fs=shared_fs)
            res[f"linear_mae_top1/{kind}"], res[f"linear_mae_best_top1/{kind}"] = lp["final_top1"], lp["best_top1"]
            res["linear_mae"] = lp
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


def linear_probe_mae(ckpt_uri: str, source: str, *, val: str | None = None, epochs: int = 90,
                     warmup_epochs: int = 10, batch_size: int = 16384, blr: float = 0.1, global_pool: bool = False,
                     val_fraction: float = 0.2, seed: int = 0, num_workers: int = 2, use_gpu: bool = False,
                     shared_fs: bool = False, overrides: tuple[str, ...] = ()) -> dict:
    """The paper's linear probe (``main_linprobe.py``) as a Ray Train job on the training workers
    (GPUs where present): ``mae finetune --linprobe`` from the checkpoint, the frozen encoder's cls
    token (or the mean patch token through a non-affine norm, ``global_pool``, as ``models_vit.py``)
    -> BatchNorm1d(affine=False) + Linear, LARS, lr = blr x global batch / 256, ``warmup_epochs``
    then cosine per iteration, RandomResizedCrop + flip views; scored on the validation set every
    epoch. Its run lives beside the checkpoint's run (``<run>-linprobe``) and resumes as any run.
    -> {"final_top1", "best_top1" (fractions), "steps", "lr", "run"}."""
    from jobs.finetune import run as run_job
    from pipeline.storage import parse_uri
    run_dir = parse_uri(ckpt_uri).parent()
    per_worker = max(1, batch_size // num_workers)
    if per_worker * num_workers != batch_size:
        raise UserError(f"--linear-batch {batch_size}: a multiple of the {num_workers} workers (global batch)")
    a = argparse.Namespace(pretrained=ckpt_uri, data=source, val=val, linprobe=True, config=None, overrides=[
        f"run.storage_path={run_dir.parent()}", f"run.name={run_dir.path.rstrip('/').rsplit('/', 1)[-1]}-linprobe",
        f"train.epochs={epochs}", f"optim.warmup_epochs={warmup_epochs}", f"train.batch_size={per_worker}",
        f"optim.base_lr={blr}", f"finetune.global_pool={str(global_pool).lower()}", f"data.val_fraction={val_fraction}",
        f"data.seed={seed}", f"train.seed={seed}", f"scaling.num_workers={num_workers}",
        f"scaling.use_gpu={str(use_gpu).lower()}", f"run.shared_fs={str(shared_fs).lower()}", *overrides])
    res = run_job(a)
    return {"final_top1": res["final_top1"] / 100, "best_top1": res["best_top1"] / 100,
            "final_top5": res["final_top5"] / 100, "evaluations": res["evaluations"], "steps": res["steps"],
            "lr": blr * batch_size / 256, "run": res["run"], "best_checkpoint": res["best_checkpoint"]}


# ---------------------------------------------------------------------------- a fine-tuned classifier
def load_classifier(uri: str, preset: str = "mae_vit_base_patch16"):
    """A fine-tuned classifier on CPU: a checkpoint (or run: its best) of ``mae finetune``, or an
    official ``mae_finetuned_vit_*.pth`` (timm layout: conv patch embedding, ``fc_norm`` under
    global pooling, ``head``; its preset named by ``preset``, its classes read from the head)."""
    import yaml

    from mae_model.vit import ViTClassifier
    u = parse_uri(uri)
    if u.path.endswith((".pth", ".pt", ".safetensors")):
        from jobs.core.config import ModelSection
        from mae_model.official import _read
        with tempfile.TemporaryDirectory(prefix="mae-eval-") as tmp:
            path = u.path
            if u.scheme != "file":
                from pipeline.storage import fsspec_fs
                fs, p = fsspec_fs(u)
                path = f"{tmp}/{u.path.rsplit('/', 1)[-1]}"
                fs.get_file(p, path)
            sd = dict(_read(path))
        if "head.weight" not in sd:
            raise UserError(f"{uri}: no classifier head (head.weight): a pretrained, not a fine-tuned, checkpoint")
        model = ViTClassifier(ModelSection(preset=preset).build(), sd["head.weight"].shape[0],
                              global_pool="fc_norm.weight" in sd)
        try:
            missing = model.load_pretrained(sd)
        except ValueError as e:
            raise UserError(f"{uri}: {e} (--preset)") from None
        if missing:
            raise UserError(f"{uri}: lacks {missing[:4]}: not a fine-tuned classifier")
        return model.eval(), {"checkpoint": uri}
    row = ckpt_tools.select(uri, best=not ckpt_tools._is_ckpt_dir(u))
    saved = yaml.safe_load(read_bytes(parse_uri(row["uri"]).join("config.yaml"))) or {}
    f = saved.get("finetune")
    if not f:
        raise UserError(f"{uri}: a pretraining checkpoint: --finetuned takes a run or checkpoint of `mae finetune` "
                        "(or an official mae_finetuned_vit_*.pth)")
    mcfg = ckpt_tools.model_config_from_yaml(yaml.safe_dump(saved))

    def make():
        return ViTClassifier(mcfg, f["num_classes"], global_pool=f["global_pool"], linprobe=f["linprobe"])
    with tempfile.TemporaryDirectory(prefix="mae-eval-") as tmp:
        model = ckpt_tools.consolidate(ckpt_tools.local_checkpoint(row["uri"], tmp), mcfg, source=row["uri"],
                                       make=make)
    return model.eval(), {"checkpoint": row["uri"], "step": row["step"], "metrics": row.get("metrics", {})}


class _Classify:
    """A Ray Data actor: the classifier, loaded once; uint8 patches -> top-1/top-5 hits and the loss."""

    def __init__(self, make_ref, state_ref):
        import ray
        import torch
        torch.set_num_threads(1)
        self.model = ray.get(make_ref)()
        self.model.load_state_dict(ray.get(state_ref))
        self.model.eval()

    def __call__(self, batch: dict) -> dict:
        import torch

        from mae_model.model import IMAGENET_MEAN, IMAGENET_STD
        x = torch.from_numpy(np.ascontiguousarray(batch["patches"])).float() / 255.0
        p2 = x.shape[-1] // 3
        x = (x - torch.tensor(IMAGENET_MEAN).repeat(p2)) / torch.tensor(IMAGENET_STD).repeat(p2)
        y = torch.from_numpy(batch["label"]).long()
        with torch.no_grad():
            logits = self.model(x)
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(y[:, None])
        return {"top1": hit[:, :1].any(1).numpy(), "top5": hit.any(1).numpy(),
                "loss": torch.nn.functional.cross_entropy(logits, y, reduction="none").numpy()}


def evaluate_finetuned(uri: str, dataset: str, *, val: str | None = None, workers: int = 2,
                       preset: str = "mae_vit_base_patch16", val_fraction: float = 0.2, seed: int = 0,
                       shared_fs: bool = False, write: bool = True) -> dict:
    """Top-1 / top-5 of a fine-tuned classifier on the validation images (``val``, else the val split
    of ``dataset``), center crops as the official evaluation (resize to img_size/0.875, crop),
    scored by ``workers`` actors on the cluster. Written beside the checkpoint as evaluation_finetuned.json."""
    import functools

    import ray

    from jobs.core.common import cluster_capacity
    from jobs.core.launch import val_split_of
    from mae_model.vit import ViTClassifier
    from pipeline.config import DataConfig
    from pipeline.dataset import build_dataset
    src = val or dataset
    check_visible_to_cluster({"DATASET": src}, shared_fs=shared_fs, setting="--shared-fs")
    model, meta = load_classifier(uri, preset)
    c = model.config
    dcfg = DataConfig(source=src, split=val_split_of(src) if val else "val", img_size=c.img_size,
                      patch_size=c.patch_size, augment=False, shuffle=False,
                      val_fraction=0.0 if val else val_fraction, seed=seed, decode_batch_size=64)
    ds, info, _ = build_dataset(dcfg)
    make = functools.partial(ViTClassifier, c, model.num_classes, global_pool=model.global_pool,
                             linprobe=model.linprobe)
    refs = (ray.put(make), ray.put({k: v.cpu() for k, v in model.state_dict().items()}))
    ds = ds.map_batches(_Classify, fn_constructor_args=refs, batch_size=64, num_cpus=1, batch_format="numpy",
                        concurrency=feature_actors(workers, cluster_capacity().get("CPU", 0.0)))
    n = top1 = top5 = loss = 0.0
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        n += len(b["top1"])
        top1, top5, loss = top1 + b["top1"].sum(), top5 + b["top5"].sum(), loss + b["loss"].sum()
    if not n:
        raise UserError(f"{src}: no validation images")
    out = {**meta, "dataset": src, "images": int(n), "classes": model.num_classes,
           "top1": float(100.0 * top1 / n), "top5": float(100.0 * top5 / n), "loss": float(loss / n)}
    if write and not uri.endswith((".pth", ".pt", ".safetensors")):
        write_bytes(parse_uri(meta["checkpoint"]).join("evaluation_finetuned.json"), json.dumps(out, indent=1).encode())
    return out


def table(res: dict) -> str:
    mae = res.get("linear_protocol") == "mae"
    rows = ["feature  k-NN top-1  linear top-1" + (" (mae protocol)" if mae else " (quick)")]
    for kind in ("cls", "mean"):
        lin = res.get(f"linear_mae_top1/{kind}" if mae else f"linear_top1/{kind}")
        best = res.get(f"linear_mae_best_top1/{kind}")
        rows.append(f"{kind:7s}  {100 * res[f'knn_top1/{kind}']:9.1f}%  "
                    + (f"{100 * lin:11.1f}%" if lin is not None else "          -")
                    + (f" (best epoch {100 * best:.1f}%)" if best is not None else ""))
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mae evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint directory or run directory (URI); --finetuned: also a .pth")
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
    ap.add_argument("--linear-batch", type=int, default=16384,
                    help="mae protocol: global batch over the workers (paper: 16384)")
    ap.add_argument("--linear-blr", type=float, default=0.1, help="mae protocol: base lr; lr = blr x batch / 256")
    ap.add_argument("--linear-workers", type=int, default=2, help="mae protocol: Ray Train workers of the probe job")
    ap.add_argument("--gpu", action="store_true", help="mae protocol: one GPU per probe worker")
    ap.add_argument("--global-pool", action="store_true", help="mae protocol: the mean patch token, not the cls token")
    ap.add_argument("--val", default=None, help="a separate validation set (prepared shards: its val split, else its "
                                                "only one); default: the val split of DATASET")
    ap.add_argument("--finetuned", action="store_true",
                    help="CHECKPOINT is a fine-tuned classifier (mae finetune's run or checkpoint, or an official "
                         "mae_finetuned_vit_*.pth): its top-1 / top-5 on the validation images")
    ap.add_argument("--preset", default="mae_vit_base_patch16", help="--finetuned with an official .pth: its model")
    ap.add_argument("--random-init", action="store_true", help="the same encoder at random init (a baseline)")
    ap.add_argument("--baseline", action="store_true",
                    help="also score the same encoder at random init, from the same feature pass, side by side")
    ap.add_argument("--shared-fs", action="store_true",
                    help="a local DATASET is on a filesystem every node mounts (else refused on a multi-node cluster)")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    return ap


def check_values(a: argparse.Namespace) -> None:
    for name in ("workers", "linear_epochs", "linear_batch", "linear_workers"):
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
    if a.finetuned:
        with one_line_errors("mae evaluate"):
            check_values(a)
            init_ray(a.address, num_cpus=a.workers + 1.02)
            r = evaluate_finetuned(a.checkpoint, a.dataset, val=a.val, workers=a.workers, preset=a.preset,
                                   val_fraction=a.val_fraction, shared_fs=a.shared_fs)
        print(f"{r['checkpoint']} on {r['dataset']}: {r['images']} images, {r['classes']} classes: "
              f"top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}")
        return 0
    with one_line_errors("mae evaluate"):
        check_values(a)
        cpus = a.workers + 1.02  # a local Ray: the feature actors and a decode task (the probe job: its workers)
        if a.linear_protocol == "mae" and not a.no_linear:
            cpus = max(cpus, a.linear_workers + 2.02)
        init_ray(a.address, num_cpus=cpus)
        res = evaluate(a.checkpoint, a.dataset, max_train=a.max_train, max_val=a.max_val, workers=a.workers,
                       val_fraction=a.val_fraction, random_init=a.random_init, baseline=a.baseline,
                       linear=not a.no_linear,
                       shared_fs=a.shared_fs, linear_protocol=a.linear_protocol, linear_epochs=a.linear_epochs,
                       linear_warmup_epochs=a.linear_warmup_epochs, linear_batch=a.linear_batch,
                       linear_blr=a.linear_blr, global_pool=a.global_pool, val=a.val,
                       linear_workers=a.linear_workers, use_gpu=a.gpu)
    print(f"{res['checkpoint']} on {res['dataset']}: {res['train_images']} train / {res['val_images']} val "
          f"images, {res['classes']} classes" + (" (random init)" if a.random_init else ""))
    print(table(res))
    if "baseline" in res:
        print("the same encoder at random initialization (baseline):")
        print(table(res["baseline"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
