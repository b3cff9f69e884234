"""Checkpoints as weights: choose one (latest / best / step), pull it verified, consolidate its
DCP shards in one process, start a run from it (``init_from``), export it to one file.

The ``mae ckpt`` command (jobs/ckpt.py) is a thin CLI over these functions; the trainer uses
:func:`init_state_dict`, ``mae evaluate`` uses :func:`local_checkpoint` and :func:`consolidate`.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings

from jobs.core import checkpoint as ckpt
from jobs.core.common import UserError
from pipeline.storage import (
    URI,
    StorageError,
    explain,
    fsspec_fs,
    parse_uri,
    read_bytes,
    storage_errors,
)

FORMATS = ("full", "encoder", "official", "timm")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_CHUNK = 8 << 20


# ---------------------------------------------------------------------------- which checkpoint
def _is_ckpt_dir(u: URI) -> bool:
    return ckpt._NAME.match(u.path.rstrip("/").rsplit("/", 1)[-1]) is not None


def _index(run: URI) -> dict[int, dict]:
    try:
        return {e["step"]: e for e in json.loads(read_bytes(run.join(ckpt.INDEX)))}
    except Exception:  # noqa: BLE001 - an old run or a damaged index: metrics just stay blank
        return {}


def describe_run(run_uri: str) -> list[dict]:
    """Every checkpoint of a run with its state (complete / incomplete / pruned), step, time,
    size and the metrics recorded with it, oldest first."""
    run = parse_uri(run_uri)
    fs, base = fsspec_fs(run)
    index = _index(run)
    rows = []
    for c in ckpt.list_checkpoints(run):
        e = index.get(c["step"], {})
        d = f"{base.rstrip('/')}/{c['name']}"
        with storage_errors(c["uri"]):
            state = ("complete" if c["complete"] else
                     "pruned" if fs.exists(f"{d}/{ckpt.PRUNED}") else "incomplete")
        row = {**c, "state": state, "bytes": e.get("bytes"), "time": e.get("time"),
               "metrics": e.get("metrics", {}), "best": bool(e.get("best"))}
        if state == "complete" and (row["bytes"] is None or not row["metrics"]):
            man = json.loads(read_bytes(parse_uri(c["uri"]).join("manifest.json")))
            ts = ckpt.read_train_state(c["uri"])
            row.update(bytes=man["total_bytes"], time=ts.get("time", man.get("created")),
                       metrics=ts.get("metrics", {}))
        rows.append(row)
    return rows


def select(uri: str, *, step: int | None = None, best: bool = False, metric: str | None = None,
           mode: str | None = None) -> dict:
    """A checkpoint directory URI (must be complete) or a run directory plus a choice
    (--step N, --best, default the latest) -> that checkpoint's row."""
    u = parse_uri(uri)
    if _is_ckpt_dir(u):
        parent = u.parent()
        rows = [r for r in describe_run(str(parent)) if r["name"] == u.path.rstrip("/").rsplit("/", 1)[-1]]
        if not rows:
            raise UserError(f"{uri}: no such checkpoint: see `mae ckpt list {parent}`")
        return _must_be_complete(rows[0])
    rows = describe_run(uri)
    if not rows:
        raise UserError(f"{uri}: no checkpoints here: give a run directory (RUN_URI) or a checkpoint "
                        "directory (RUN_URI/checkpoint_NNNNNNNN)")
    if step is not None:
        hit = [r for r in rows if r["step"] == step]
        if not hit:
            raise UserError(f"{uri}: no checkpoint at step {step}: steps here are "
                            f"{', '.join(str(r['step']) for r in rows)}")
        return _must_be_complete(hit[0])
    done = [r for r in rows if r["state"] == "complete"]
    if not done:
        raise UserError(f"{uri}: no complete checkpoint yet (a save that did not finish has no "
                        f"{ckpt.MARKER} marker): wait for the run's next checkpoint")
    if not best:
        return done[-1]
    run_metric, run_mode = _run_best_metric(parse_uri(uri))  # the run's own rule (fine-tuning: top-1, max)
    if metric is None:
        metric, mode = run_metric or "loss", mode or run_mode
    mode = mode or "min"
    scored = [r for r in done if isinstance(r["metrics"].get(metric), (int, float))]
    if not scored:
        raise UserError(f"{uri}: no complete checkpoint recorded the metric {metric!r}: "
                        "pick one with --step, or name another with --metric")
    pick = min if mode == "min" else max
    return pick(scored, key=lambda r: r["metrics"][metric])


def _must_be_complete(row: dict) -> dict:
    if row["state"] != "complete":
        why = ("was pruned (only the last and best checkpoints are kept)" if row["state"] == "pruned"
               else f"is incomplete (no {ckpt.MARKER} marker: its save did not finish)")
        raise UserError(f"{row['uri']} {why}: pull a complete one (mae ckpt list RUN_URI)")
    return row


def _run_best_metric(run: URI) -> tuple[str | None, str | None]:
    """-> the run's (train.best_metric, train.best_mode), from its config.yaml (None: unknown)."""
    import yaml
    try:
        train = yaml.safe_load(read_bytes(run.join("config.yaml")))["train"]
        return train["best_metric"], train.get("best_mode", "min")
    except Exception:  # noqa: BLE001 - no run config next to the checkpoints: the caller defaults
        return None, None


# ---------------------------------------------------------------------------- pull
class ChecksumError(UserError):
    pass


def _fetch(fs, remote: str, local: str, want: dict, bar) -> None:
    """Stream one object to ``local.part`` while hashing it; keep it only if size and sha256
    match the manifest (then rename into place)."""
    part = local + ".part"
    h, n = hashlib.sha256(), 0
    os.makedirs(os.path.dirname(local), exist_ok=True)
    try:
        with fs.open(remote, "rb", block_size=_CHUNK) as src, open(part, "wb") as dst:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                dst.write(chunk)
                n += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
    except FileNotFoundError:
        _discard(part)
        raise ChecksumError(f"{remote}: listed in the checkpoint's manifest but missing from storage: "
                            "the checkpoint is damaged; pull another one (mae ckpt list RUN_URI)") from None
    except Exception as e:  # noqa: BLE001 - one line naming the object, the rest of the pull stops
        _discard(part)
        raise StorageError(explain(remote, e)) from None
    except BaseException:
        _discard(part)
        raise
    if n != want["size"] or h.hexdigest() != want["sha256"]:
        _discard(part)
        what = f"size {n} != {want['size']}" if n != want["size"] else "sha256 differs from the manifest"
        raise ChecksumError(f"{remote}: {what}: the stored file was altered or truncated after the save; "
                            "pull another checkpoint (mae ckpt list RUN_URI)")
    os.replace(part, local)


def _discard(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _intact(path: str, want: dict) -> bool:
    return (os.path.isfile(path) and os.path.getsize(path) == want["size"]
            and ckpt.sha256_file(path) == want["sha256"])


def pull(ckpt_uri: str, dest: str, *, workers: int = 8, progress: bool = True) -> str:
    """Download one complete checkpoint into ``dest/<name>``, verified; returns that directory.

    Resumable: intact files already there are kept. The local ``COMPLETE`` marker is written last,
    only when every file has been verified."""
    u = parse_uri(ckpt_uri)
    name = u.path.rstrip("/").rsplit("/", 1)[-1]
    out = os.path.join(os.path.abspath(os.path.expanduser(dest)), name)
    fs, base = fsspec_fs(u)
    with storage_errors(u):
        if not fs.exists(f"{base.rstrip('/')}/{ckpt.MARKER}"):
            raise UserError(f"{ckpt_uri} is incomplete (no {ckpt.MARKER} marker: its save did not finish): "
                            "pull a complete one (mae ckpt list RUN_URI)")
    manifest_bytes = read_bytes(u.join("manifest.json"))
    files = json.loads(manifest_bytes)["files"]
    os.makedirs(out, exist_ok=True)
    _discard(os.path.join(out, ckpt.MARKER))  # an earlier pull of this name may be stale
    todo = {rel: w for rel, w in files.items() if not _intact(os.path.join(out, rel), w)}
    kept = len(files) - len(todo)
    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=sum(w["size"] for w in todo.values()), unit="B", unit_scale=True,
                   unit_divisor=1024, desc=f"pull {name}", file=sys.stderr)
    try:
        with cf.ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo) or 1))) as pool:
            futs = [pool.submit(_fetch, fs, f"{base.rstrip('/')}/{rel}", os.path.join(out, rel), w, bar)
                    for rel, w in todo.items()]
            for f in cf.as_completed(futs):
                f.result()
    finally:
        if bar is not None:
            bar.close()
    with open(os.path.join(out, "manifest.json"), "wb") as f:
        f.write(manifest_bytes)
    with open(os.path.join(out, ckpt.MARKER), "w") as f:
        f.write("ok\n")
    if kept:
        print(f"kept {kept} intact files from an earlier pull", file=sys.stderr)
    return out


# ---------------------------------------------------------------------------- export
class local_dcp_dir:
    """A local checkpoint directory as ``dcp.load`` wants it: an earlier version's ``dcp.metadata`` seen as
    ``.metadata``, through a temporary directory of symlinks (the user's copy is not touched)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    def __enter__(self) -> str:
        if os.path.exists(os.path.join(self.path, ".metadata")):
            self.tmp = None
            return self.path
        if not os.path.exists(os.path.join(self.path, ckpt.LEGACY_METADATA)):
            raise UserError(f"{self.path}: not a checkpoint directory (no {ckpt.LEGACY_METADATA}); give a "
                            "directory made by `mae ckpt pull` or a checkpoint URI")
        self.tmp = tempfile.mkdtemp(prefix="mae-dcp-")
        for fn in os.listdir(self.path):
            os.symlink(os.path.join(self.path, fn), os.path.join(self.tmp, fn))
        os.symlink(os.path.join(self.path, ckpt.LEGACY_METADATA), os.path.join(self.tmp, ".metadata"))
        return self.tmp

    def __exit__(self, *exc) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def local_checkpoint(src: str, tmp: str, *, progress: bool = False) -> str:
    """A checkpoint as a local directory ready for :func:`consolidate`: ``src`` itself if it is
    one (pulled, or written by a run on local disk), else ``src`` names a checkpoint or run
    directory (local or on a store) whose chosen checkpoint is pulled, verified, into ``tmp``."""
    if os.path.isdir(src) and any(os.path.exists(os.path.join(src, m)) for m in (ckpt.LEGACY_METADATA, ".metadata")):
        if not os.path.exists(os.path.join(src, ckpt.MARKER)):
            raise UserError(f"{src}: incomplete checkpoint (no {ckpt.MARKER}): if `mae ckpt pull` made it, "
                            "run the same pull again to finish it")
        return src
    return pull(select(src)["uri"], tmp, progress=progress)


def model_config_from_yaml(text: str | bytes):
    """The MAEConfig of a run, from its saved config.yaml."""
    import yaml

    from jobs.core.config import ModelSection
    m = (yaml.safe_load(text) or {}).get("model", {})
    return ModelSection(preset=m.get("preset", "mae_vit_base_patch16"), overrides=m.get("overrides", {})).build()


def model_config_in(local_dir: str):
    path = os.path.join(local_dir, "config.yaml")
    if not os.path.exists(path):
        raise UserError(f"{local_dir}: no config.yaml: not a checkpoint of this project")
    with open(path) as f:
        return model_config_from_yaml(f.read())


def _source_name(local_dir: str, source: str | None) -> str:
    """What to call the checkpoint in a message: ``source`` as the user gave it (a checkpoint, or
    the run whose checkpoint was pulled into ``local_dir``), else the local directory."""
    if not source:
        return local_dir
    name = os.path.basename(os.path.normpath(local_dir))
    if os.path.abspath(source) == os.path.abspath(local_dir) or source.rstrip("/").endswith("/" + name):
        return source
    return f"{source.rstrip('/')}/{name}"


def consolidate(local_dir: str, cfg=None, *, source: str | None = None, make=None):
    """-> the full model on CPU from a local checkpoint directory's DCP shards, in one process.

    The model (of the checkpoint's own config, or ``cfg``) is built on the meta device and
    materialized empty (no init pass), then DCP reads only the model entries (not the
    optimizer's) straight into its tensors: peak memory is about the model's own size. The
    ``.metadata`` is unpickled through an allowlist (a refusal names ``source``, the checkpoint or
    run it was pulled from, else ``local_dir``)."""
    import torch
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from jobs.core.safeload import CheckpointRefused, SafeFileSystemReader
    from jobs.core.safeload import load as safe_load
    from mae_model import MaskedAutoencoder
    cfg = cfg or model_config_in(local_dir)
    with torch.device("meta"):  # ``make``: another module of the checkpoint (a fine-tuned classifier)
        model = make() if make else MaskedAutoencoder(cfg)
    model.to_empty(device="cpu")
    if hasattr(model, "init_buffers"):
        model.init_buffers()
    sd = model.state_dict()
    with local_dcp_dir(local_dir) as d, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            safe_load({"model": sd}, SafeFileSystemReader(d, where=_source_name(local_dir, source)), no_dist=True)
        except CheckpointRefused:
            raise
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's errors are long tracebacks
            if "size" in str(e).lower() or "shape" in str(e).lower() or "missing" in str(e).lower():
                raise UserError(f"{local_dir}: its model does not match this model config "
                                f"(embed_dim={cfg.embed_dim}, depth={cfg.depth}, decoder_depth="
                                f"{cfg.decoder_depth}, patch_size={cfg.patch_size}): pick the matching "
                                "model.preset / model.overrides") from None
            raise
    return model


def init_state_dict(uri: str, cfg, *, verbose: bool = True) -> dict:
    """Weights to start a run from (``model.init_from``), as a full CPU state dict of our layout
    holding only the tensors the source provides (an encoder-only source leaves the decoder out).

    ``uri``: an official MAE ``.pth`` (full or encoder-only), an export of ``mae ckpt export``
    (``.safetensors`` / ``.pth``, any format), a pulled checkpoint directory, or a checkpoint /
    run directory on storage (its latest complete checkpoint)."""
    from mae_model import MaskedAutoencoder, OfficialLayoutError, load_official_state_dict
    u = parse_uri(uri)
    if u.path.endswith((".pth", ".pt", ".safetensors")):
        with tempfile.TemporaryDirectory(prefix="mae-init-") as tmp:
            path = u.path
            if u.scheme != "file":  # one file from the store, then the same loader as a local file
                path = os.path.join(tmp, os.path.basename(u.path))
                fs, p = fsspec_fs(u)
                with storage_errors(u):
                    fs.get_file(p, path)
            full = MaskedAutoencoder(cfg)
            try:
                info = load_official_state_dict(full, path, verbose=verbose)
            except OfficialLayoutError as e:  # name the file as the user gave it, not its download
                raise OfficialLayoutError(str(e).replace(path, uri)) from None
        return {k: v for k, v in full.state_dict().items() if k not in info["missing"]}
    with tempfile.TemporaryDirectory(prefix="mae-init-") as tmp:
        return dict(consolidate(local_checkpoint(str(u), tmp), cfg, source=uri).state_dict())


def export_state_dict(model, fmt: str) -> dict:
    from mae_model.official import is_encoder_key, to_official_state_dict
    if fmt == "full":
        return dict(model.state_dict())
    if fmt == "encoder":
        return {k: v for k, v in model.state_dict().items() if is_encoder_key(k)}
    if fmt == "official":
        return to_official_state_dict(model, copy=False)
    if fmt == "timm":
        return to_official_state_dict(model, encoder_only=True, copy=False)
    raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def export(src: str, fmt: str, out: str, dtype: str = "fp32") -> str:
    """Checkpoint (local directory from `pull`, or a checkpoint/run URI) -> one file; returns its path."""
    import torch
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = os.path.abspath(os.path.expanduser(out))
    if not out.endswith((".safetensors", ".pth", ".pt")):
        out += ".pth" if fmt == "official" else ".safetensors"
    with tempfile.TemporaryDirectory(prefix="mae-export-") as tmp:
        model = consolidate(local_checkpoint(src, tmp, progress=sys.stderr.isatty()), source=src)  # tensors in memory
    sd = export_state_dict(model, fmt)
    target = getattr(torch, DTYPES[dtype])
    sd = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    meta = {"format": f"ray-mae/{fmt}", "dtype": dtype, "mae_config": json.dumps(model.config.to_dict())}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    part = out + ".part"
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, part, metadata=meta)
    else:
        torch.save({"model": sd, "mae_config": model.config.to_dict(), "format": meta["format"]}, part)
    os.chmod(part, 0o644)
    os.replace(part, out)  # never a half-written export under the final name
    return out
