"""Sharded, self-describing checkpoints on object storage.

Layout of one checkpoint (a directory under the run directory)::

    RUN/checkpoint_00001000/
        dcp.metadata, __0_0.distcp, __1_0.distcp, ... torch.distributed.checkpoint shards
                                                     (model + optimizer, resharding on load)
        rng_rank0.pt, ...                            per-rank RNG states
        train_state.json                             step, epoch, position in epoch, metrics
        config.yaml                                  the resolved run config
        manifest_rank0.json, ...                     per-rank files with sizes and sha256
        manifest.json                                all files, merged (for `mae ckpt pull`)
        COMPLETE                                     written last: only then does it count

Each rank writes its shard locally and hands the directory to ``ray.train.report`` (Ray merges
the ranks' directories in storage); after a barrier rank 0 writes the merged manifest and the
marker. A checkpoint without ``COMPLETE`` is never taken as the latest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time

import numpy as np
import torch

from pipeline.storage import URI, fsspec_fs, parse_uri, read_bytes, storage_errors, write_bytes

MARKER = "COMPLETE"
PRUNED = "PRUNED"
DCP_METADATA = "dcp.metadata"  # DCP's ".metadata", renamed: Ray's upload skips hidden files
INDEX = "checkpoints.json"
_NAME = re.compile(r"^checkpoint_(\d{8,})$")


def ckpt_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def file_manifest(local_dir: str) -> dict[str, dict]:
    out = {}
    for root, _, files in os.walk(local_dir):
        for fn in files:
            p = os.path.join(root, fn)
            rel = os.path.relpath(p, local_dir)
            out[rel] = {"size": os.path.getsize(p), "sha256": sha256_file(p)}
    return out


# ---------------------------------------------------------------------------- discovery
def list_checkpoints(run_dir: str | URI) -> list[dict]:
    """All checkpoint directories under a run, oldest first: {name, step, uri, complete}."""
    u = run_dir if isinstance(run_dir, URI) else parse_uri(run_dir)
    fs, p = fsspec_fs(u)
    with storage_errors(u):
        if not fs.exists(p):
            return []
        entries = fs.ls(p, detail=False)
    out = []
    for e in entries:
        name = e.rstrip("/").rsplit("/", 1)[-1]
        m = _NAME.match(name)
        if not m:
            continue
        with storage_errors(u):
            complete = fs.exists(f"{p.rstrip('/')}/{name}/{MARKER}")
        out.append({"name": name, "step": int(m.group(1)), "uri": str(u.join(name)), "complete": complete})
    return sorted(out, key=lambda d: d["step"])


def latest_complete(run_dir: str | URI) -> dict | None:
    done = [c for c in list_checkpoints(run_dir) if c["complete"]]
    return done[-1] if done else None


def read_train_state(ckpt_uri: str) -> dict:
    return json.loads(read_bytes(parse_uri(ckpt_uri).join("train_state.json")))


# ---------------------------------------------------------------------------- save
def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def write_local(model, optimizer, local_dir: str, *, rank: int, train_state: dict, config_yaml: str) -> None:
    """Collective: every rank writes its DCP shard (+ RNG, + manifest) into ``local_dir``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=local_dir)
    if rank == 0:  # hidden files are not uploaded by Ray: store DCP's ".metadata" visibly
        os.replace(os.path.join(local_dir, ".metadata"), os.path.join(local_dir, DCP_METADATA))
    torch.save(rng_state(), os.path.join(local_dir, f"rng_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(local_dir, "train_state.json"), "w") as f:
            json.dump(train_state, f, indent=1)
        with open(os.path.join(local_dir, "config.yaml"), "w") as f:
            f.write(config_yaml)
    files = file_manifest(local_dir)
    with open(os.path.join(local_dir, f"manifest_rank{rank}.json"), "w") as f:
        json.dump(files, f)


def finalize(ckpt_uri: str, world_size: int) -> dict:
    """Rank 0, after every rank's upload: merged manifest, then the marker (last)."""
    u = parse_uri(ckpt_uri)
    files: dict[str, dict] = {}
    for r in range(world_size):
        files.update(json.loads(read_bytes(u.join(f"manifest_rank{r}.json"))))
    manifest = {"files": files, "total_bytes": sum(f["size"] for f in files.values()),
                "world_size": world_size, "created": time.time()}
    write_bytes(u.join("manifest.json"), json.dumps(manifest, indent=1).encode())
    write_bytes(u.join(MARKER), b"ok\n")
    return manifest


def update_index_and_prune(run_dir: str, entry: dict, keep_last: int, best_metric: str) -> list[str]:
    """Rank 0: record the new checkpoint in the run's index; delete all but the last
    ``keep_last`` complete checkpoints and the best one (lower ``best_metric`` is better).
    Incomplete checkpoints older than the newest complete one are removed too."""
    u = parse_uri(run_dir)
    try:
        index = json.loads(read_bytes(u.join(INDEX)))
    except Exception:  # noqa: BLE001 - first checkpoint, or an unreadable index: rebuild
        index = []
    index = [e for e in index if e["step"] != entry["step"]] + [entry]
    index.sort(key=lambda e: e["step"])
    complete = [e for e in index if e.get("complete")]
    keep = {e["step"] for e in complete[-keep_last:]}
    scored = [e for e in complete if isinstance(e.get("metrics", {}).get(best_metric), (int, float))]
    if scored:
        keep.add(min(scored, key=lambda e: e["metrics"][best_metric])["step"])
    newest = complete[-1]["step"] if complete else -1
    removed = []
    fs, base = fsspec_fs(u)
    for c in list_checkpoints(u):
        if c["step"] in keep or c["step"] > newest:
            continue
        d = f"{base.rstrip('/')}/{c['name']}"
        with storage_errors(c["uri"]):
            if fs.exists(f"{d}/{PRUNED}"):
                continue
            fs.rm(f"{d}/{MARKER}")  # first: never a half-deleted "complete" checkpoint
            fs.rm(d, recursive=True)
        # Ray Train's run snapshot still lists this directory and refuses to resume a run whose
        # checkpoints vanished: leave the (emptied) directory with a note in it.
        write_bytes(parse_uri(c["uri"]).join(PRUNED), b"pruned: not among the last/best checkpoints kept\n")
        removed.append(c["name"])
    index = [e for e in index if e["name"] not in removed]
    write_bytes(u.join(INDEX), json.dumps(index, indent=1).encode())
    return removed


# ---------------------------------------------------------------------------- load
def download(ckpt_uri: str) -> str:
    """Copy a checkpoint directory to a local temporary directory, ready for ``dcp.load``."""
    u = parse_uri(ckpt_uri)
    local = tempfile.mkdtemp(prefix="mae-ckpt-")
    fs, p = fsspec_fs(u)
    with storage_errors(u):
        fs.get(p.rstrip("/") + "/", local + "/", recursive=True)
    meta = os.path.join(local, DCP_METADATA)
    if os.path.exists(meta):
        os.replace(meta, os.path.join(local, ".metadata"))
    return local


def load_into(model, optimizer, local_dir: str, *, rank: int, load_optimizer: bool = True) -> None:
    """Collective: load (and reshard) model and optimizer state; restore this rank's RNG if the
    checkpoint has one for it (a different world size gives fresh per-rank streams)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd} if load_optimizer else {"model": model_sd}
    dcp.load(state, checkpoint_id=local_dir)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"] if load_optimizer else optim_sd)
    rng = os.path.join(local_dir, f"rng_rank{rank}.pt")
    if os.path.exists(rng):
        set_rng_state(torch.load(rng, weights_only=False))


def cleanup_local(path: str) -> None:
    if path.startswith(tempfile.gettempdir()):
        shutil.rmtree(path, ignore_errors=True)
