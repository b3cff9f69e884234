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

import numpy as np
import torch

from jobs.core import weights as ckpt_tools
from jobs.core.common import UserError, init_ray, one_line_errors
from jobs.core.probe import evaluate_features
from mae_model import MaskedAutoencoder
from pipeline.storage import check_visible_to_cluster, parse_uri, read_bytes, write_bytes


def model_config_of(ckpt_uri: str):
    return ckpt_tools.model_config_from_yaml(read_bytes(parse_uri(ckpt_uri).join("config.yaml")))


def load_model(ckpt_uri: str, random_init: bool = False, seed: int = 0) -> MaskedAutoencoder:
    """The full model on CPU in one process (DCP shards consolidated, no process group), or the
    same architecture at random initialization (seeded)."""
    if random_init:
        torch.manual_seed(seed)
        return MaskedAutoencoder(model_config_of(ckpt_uri))
    with tempfile.TemporaryDirectory(prefix="mae-eval-") as tmp:
        return ckpt_tools.consolidate(ckpt_tools.local_checkpoint(ckpt_uri, tmp))


class _Features:
    """A Ray Data actor: the frozen encoder, once per actor; uint8 patches -> features."""

    def __init__(self, cfg_dict: dict, state_ref):
        import ray
        from mae_model import MAEConfig
        torch.set_num_threads(1)
        self.model = MaskedAutoencoder(MAEConfig.from_dict(cfg_dict))
        self.model.load_state_dict(ray.get(state_ref[0]) if isinstance(state_ref, list) else state_ref)
        self.model.eval()

    def __call__(self, batch: dict) -> dict:
        with torch.no_grad():
            f = self.model.forward_features(torch.from_numpy(np.ascontiguousarray(batch["patches"])))
        return {"cls": f["cls"].numpy(), "mean": f["mean"].numpy(), "label": batch["label"]}


def extract(model: MaskedAutoencoder, source: str, split: str, limit: int | None, workers: int,
            val_fraction: float, seed: int) -> tuple[dict, torch.Tensor]:
    import ray
    from pipeline.dataset import DataConfig, build_dataset
    c = model.config
    dcfg = DataConfig(source=source, split=split, img_size=c.img_size, patch_size=c.patch_size, augment=False,
                      shuffle=False, val_fraction=val_fraction, seed=seed, decode_batch_size=64)
    ds, info, _ = build_dataset(dcfg)
    if not info.labeled and info.kind == "images":
        raise UserError(f"{source}: no labels (use the class_name/file.jpg layout or prepared shards with classes)")
    if limit:
        ds = ds.limit(limit)
    ref = [ray.put({k: v.cpu() for k, v in model.state_dict().items()})]  # in a list: passed by reference
    ds = ds.map_batches(_Features, fn_constructor_kwargs={"cfg_dict": c.to_dict(), "state_ref": ref},
                        batch_size=64, concurrency=max(1, workers), num_cpus=1, batch_format="numpy")
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    if not parts:
        raise UserError(f"{source}: the {split!r} split yielded no images")
    feats = {k: torch.from_numpy(np.concatenate([p[k] for p in parts])) for k in ("cls", "mean")}
    labels = torch.from_numpy(np.concatenate([p["label"] for p in parts])).long()
    if (labels < 0).any():
        raise UserError(f"{source}: {int((labels < 0).sum())} images of the {split!r} split have no label")
    return feats, labels


def evaluate(ckpt_uri: str, dataset: str, *, max_train: int | None = None, max_val: int | None = None,
             workers: int = 2, val_fraction: float = 0.2, seed: int = 0, random_init: bool = False,
             linear: bool = True, write: bool = True, shared_fs: bool = False) -> dict:
    check_visible_to_cluster({"DATASET": dataset}, shared_fs=shared_fs, setting="--shared-fs")
    ckpt_uri = ckpt_tools.select(ckpt_uri)["uri"]  # a complete checkpoint, or a run's latest
    model = load_model(ckpt_uri, random_init=random_init, seed=seed)
    tr, tr_y = extract(model, dataset, "train", max_train, workers, val_fraction, seed)
    va, va_y = extract(model, dataset, "val", max_val, workers, val_fraction, seed)
    C = int(max(tr_y.max(), va_y.max())) + 1
    res = evaluate_features(tr, tr_y, va, va_y, num_classes=C, linear=linear)
    out = {"checkpoint": ckpt_uri, "dataset": dataset, "random_init": random_init, "train_images": len(tr_y),
           "val_images": len(va_y), "classes": C, "k": 20, "temperature": 0.07, **res}
    if write:
        name = "evaluation_random_init.json" if random_init else "evaluation.json"
        write_bytes(parse_uri(ckpt_uri).join(name), json.dumps(out, indent=1).encode())
    return out


def table(res: dict) -> str:
    rows = ["feature  k-NN top-1  linear top-1"]
    for kind in ("cls", "mean"):
        lin = res.get(f"linear_top1/{kind}")
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
    ap.add_argument("--random-init", action="store_true", help="the same encoder at random init (a baseline)")
    ap.add_argument("--shared-fs", action="store_true",
                    help="a local DATASET is on a filesystem every node mounts (else refused on a multi-node cluster)")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    with one_line_errors("mae evaluate"):
        init_ray(a.address)
        res = evaluate(a.checkpoint, a.dataset, max_train=a.max_train, max_val=a.max_val, workers=a.workers,
                       val_fraction=a.val_fraction, random_init=a.random_init, linear=not a.no_linear,
                       shared_fs=a.shared_fs)
    print(f"{res['checkpoint']} on {res['dataset']}: {res['train_images']} train / {res['val_images']} val "
          f"images, {res['classes']} classes" + (" (random init)" if a.random_init else ""))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
