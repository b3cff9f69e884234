"""mae ckpt list | pull | export: checkpoints out of object storage.

    mae ckpt list   s3://bucket/runs/mae-vit-b
    mae ckpt pull   s3://bucket/runs/mae-vit-b --best ./weights
    mae ckpt export ./weights/checkpoint_00040000 --format timm --dtype bf16 vit_b_mae.safetensors

``pull`` downloads every file of one complete checkpoint in parallel into DEST/<checkpoint name>,
checking each against the manifest written at save time (size and sha256); files already there
and intact are kept, so an interrupted pull resumes where it stopped. ``export`` consolidates the
sharded (DCP) model state in one process, without Ray or a GPU, in memory close to the model's
size, and writes one file:

    full      our layout, encoder + decoder (safetensors, the MAE config in its metadata)
    encoder   our layout, encoder only
    official  the official MAE layout (``models_mae.py``): ``.pth`` with {"model": ...}, loadable
              by the official code's ``load_state_dict``; ``.safetensors`` also accepted
    timm      the encoder in timm's ViT layout (as the released mae_pretrain_vit_*.pth): loads
              into ``timm.create_model("vit_base_patch16_224", num_classes=0)`` with strict keys

Any of them can start a new run: ``mae pretrain model.init_from=FILE``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json

from jobs.core.common import one_line_errors
from jobs.core.weights import DTYPES, FORMATS, describe_run, export, pull, select


# ---------------------------------------------------------------------------- list
def _num(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-"
    return str(v) if isinstance(v, int) else f"{v:.4g}"


def _fmt_row(r: dict, metric_names: list[str]) -> list[str]:
    when = dt.datetime.fromtimestamp(r["time"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if r["time"] else "-"
    size = f"{r['bytes'] / 2**20:.1f} MiB" if r["bytes"] else "-"
    ms = [_num(r["metrics"].get(m)) for m in metric_names]
    return [r["name"], str(r["step"]), r["state"] + (" (best)" if r.get("best") else ""), when, size, *ms]


def cmd_list(a) -> int:
    rows = describe_run(a.run)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no checkpoints under {a.run}")
        return 0
    names = [m for m in ("loss", "knn_top1", "val/top1", "val/top5", "lr", "images_seen")
             if any(m in r["metrics"] for r in rows)]
    table = [["checkpoint", "step", "state", "time (UTC)", "size", *names]]
    table += [_fmt_row(r, names) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def cmd_pull(a) -> int:
    row = select(a.src, step=a.step, best=a.best, metric=a.metric, mode=a.mode)
    out = pull(row["uri"], a.dest, workers=a.workers, progress=not a.quiet)
    print(out)
    return 0


def cmd_export(a) -> int:
    out = export(a.src, a.format, a.out, a.dtype)
    print(out)
    return 0


# ---------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mae ckpt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list", help="checkpoints of a run: step, state, time, size, metrics")
    p.add_argument("run", help="run directory, e.g. s3://bucket/runs/NAME")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_list)
    p = sub.add_parser("pull", help="download one complete checkpoint, verified against its manifest")
    p.add_argument("src", help="run directory (then --latest/--best/--step) or a checkpoint directory")
    p.add_argument("dest", help="local directory; the checkpoint lands in DEST/<checkpoint name>")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--step", type=int, default=None, help="the checkpoint of this step")
    g.add_argument("--latest", action="store_true", help="the newest complete checkpoint (default)")
    g.add_argument("--best", action="store_true", help="the best by --metric among complete checkpoints")
    p.add_argument("--metric", default=None, help="metric for --best (default: the run's train.best_metric)")
    p.add_argument("--mode", choices=("min", "max"), default=None,
                   help="lower (min) or higher (max) is better (default: the run's train.best_mode)")
    p.add_argument("--workers", type=int, default=8, help="parallel downloads (default 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_pull)
    p = sub.add_parser("export", help="consolidate the shards into one safetensors/.pth file (no Ray, no GPU)")
    p.add_argument("src", help="a pulled checkpoint directory, or a checkpoint/run URI (pulled first)")
    p.add_argument("out", help="output file (.safetensors or .pth; default suffix by format)")
    p.add_argument("--format", choices=FORMATS, default="full", help="key layout (default full)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="tensor dtype (default fp32)")
    p.set_defaults(fn=cmd_export)
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    with one_line_errors(f"mae ckpt {a.cmd}"):
        return a.fn(a)


if __name__ == "__main__":
    raise SystemExit(main())
