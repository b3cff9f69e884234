"""Sharded, self-describing checkpoints on object storage, at a cost that does not grow with the run.

Layout of one checkpoint (a directory under the run directory)::

    RUN/checkpoint_00001000/
        .metadata, __0_0.distcp, __1_0.distcp, ...  standard torch.distributed.checkpoint (DCP):
                                                     model + optimizer, resharding on load; torch's
                                                     own FileSystemReader / dcp_to_torch_save read it
                                                     (this project reads it as data: jobs.core.safeload)
        rng_rank0.pt, ...                            per-rank RNG states (tensors only: weights_only)
        train_state.json                             step, images seen (the data position), metrics
        config.yaml                                  the resolved run config
        manifest.json                                every file with size and sha256 (`mae ckpt pull`)
        COMPLETE                                     written last: only then does it count
    RUN/checkpoints.json                             the index: kept checkpoints with their metrics

Saving: every rank writes its DCP shard to its node's disk (the only part on the training path),
then uploads it in the background (Ray Train's ASYNC upload, one upload at a time per worker) and
hashes its files there; when a rank's upload is in storage it sends its file list to rank 0 (one
small gather on a process group of the upload threads only). Rank 0's upload thread, once it has
every rank's list, writes ``manifest.json``, then the ``COMPLETE`` marker, the index, and prunes:
so a marker never precedes the last shard. Its requests per save are constant: the index is kept
in memory, pruning is decided from it, and a pruned directory is emptied by one listing of it.

Loading: one choice of checkpoint for all ranks (rank 0 reads the index and broadcasts), then
what each rank needs, read once: under FSDP2/HSDP every rank reads only the byte ranges of its
shards straight from storage (DCP's fsspec reader, in file order); under DDP (every rank holds the
whole state) rank 0 alone reads it and broadcasts it, so a restart of 64 DDP ranks reads the
checkpoint once, not 64 times.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import time

from jobs.core.common import say
from pipeline.storage import URI, StorageError, Store, fsspec_options

MARKER = "COMPLETE"
PRUNED = "PRUNED"
METADATA = ".metadata"            # DCP's own name: the directory is a standard DCP checkpoint
LEGACY_METADATA = "dcp.metadata"  # what checkpoints of earlier versions hold instead
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


def _store(run: str | URI | Store) -> Store:
    return run if isinstance(run, Store) else Store(run)


# ---------------------------------------------------------------------------- discovery
def list_checkpoints(run_dir: str | URI | Store) -> list[dict]:
    """Every checkpoint directory of a run, oldest first: {name, step, uri, complete}. Lists the
    run directory and asks each for its marker: for ``mae ckpt list``, never on the training path."""
    run = _store(run_dir)
    if not run.exists():
        return []
    out = []
    for name in run.ls():
        m = _NAME.match(name)
        if m:
            out.append({"name": name, "step": int(m.group(1)), "uri": run.uri_of(name),
                        "complete": run.exists(f"{name}/{MARKER}")})
    return sorted(out, key=lambda d: d["step"])


def read_index(run: Store) -> list[dict] | None:
    """The run's index (oldest first), or None when there is none yet. A damaged or unreadable
    index raises: it is never taken as "no checkpoints" (that would prune every kept one)."""
    raw = run.read_if_exists(INDEX)
    if raw is None:
        return None
    try:
        index = json.loads(raw)
        assert isinstance(index, list) and all("step" in e and "name" in e for e in index)
    except Exception:  # noqa: BLE001 - one line naming the file
        raise StorageError(f"{run.uri_of(INDEX)}: the checkpoint index is damaged: restore it, or delete it "
                           "to rebuild it from a listing of the run directory") from None
    return sorted(index, key=lambda e: e["step"])


def latest_complete(run_dir: str | URI | Store) -> dict | None:
    """The newest complete checkpoint {name, step, uri, complete}: from the index (two requests,
    whatever the run's length), or from a listing for a run without an index."""
    run = _store(run_dir)
    index = read_index(run)
    if index is None:
        done = [c for c in list_checkpoints(run) if c["complete"]]
        return done[-1] if done else None
    return _latest_in(run, index)


def _latest_in(run: Store, index: list[dict]) -> dict | None:
    """The newest entry of an index whose marker is there (normally one request)."""
    for e in reversed(index):
        if e.get("complete") and run.exists(f"{e['name']}/{MARKER}"):
            return {"name": e["name"], "step": e["step"], "uri": run.uri_of(e["name"]), "complete": True}
    return None


def read_train_state(ckpt_uri: str | URI | Store) -> dict:
    return json.loads(_store(ckpt_uri).read("train_state.json"))


# ---------------------------------------------------------------------------- save
def rng_state() -> dict:
    """This process's RNG streams as tensors and plain numbers (loadable with weights_only=True)."""
    import numpy as np
    import torch
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, pstate, pgauss = random.getstate()
    s = {"torch": torch.get_rng_state(),
         "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
         "python": [version, list(pstate), pgauss]}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict) -> None:
    import numpy as np
    import torch
    torch.set_rng_state(s["torch"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, pstate, pgauss = s["python"]
    random.setstate((version, tuple(pstate), pgauss))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def write_local(model, optimizer, local_dir: str, *, rank: int, train_state: dict, config_yaml: str) -> None:
    """Collective: every rank writes its DCP shard and RNG state into ``local_dir`` (rank 0 also
    the train state and config). Hashing and upload come after, off the training path."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=local_dir)
    write_small(local_dir, rank=rank, train_state=train_state, config_yaml=config_yaml)


def write_small(local_dir: str, *, rank: int, train_state: dict, config_yaml: str) -> None:
    """This rank's RNG state (rank 0 also the train state and config) into ``local_dir``."""
    import torch
    torch.save(rng_state(), os.path.join(local_dir, f"rng_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(local_dir, "train_state.json"), "w") as f:
            json.dump(train_state, f, indent=1)
        with open(os.path.join(local_dir, "config.yaml"), "w") as f:
            f.write(config_yaml)


def make_stager(pin_memory: bool):
    """A stager that copies a model's and optimizer's state into host memory it keeps and reuses
    (torch's ``DefaultStager``, synchronous: one save is in flight at a time, so the copy of the
    last save has been written before the next overwrites it)."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    return DefaultStager(StagingOptions(use_pinned_memory=pin_memory, use_shared_memory=False,
                                        use_async_staging=False, use_non_blocking_copy=False))


def stage(model, optimizer, stager) -> dict:
    """On the training path: this rank's part of the state (its shards under FSDP2/HSDP), copied
    to host memory -> the state dict :func:`write_staged` writes later, while training goes on."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return stager.stage({"model": model_sd, "optim": optim_sd})


def write_staged(staged: dict, local_dir: str, *, group, world: int) -> None:
    """Off the training path (an upload thread): the staged state as this rank's DCP shard in
    ``local_dir``. DCP's planning is collective: on ``group``, a process group of the upload
    threads only, so that it never meets a collective of the training thread."""
    import torch.distributed.checkpoint as dcp
    dcp.save(staged, checkpoint_id=local_dir, process_group=group, no_dist=world == 1)


def build_manifest(files_per_rank: list[dict], world_size: int) -> dict:
    """Every rank's files (size, sha256), gathered in memory on rank 0 -> the manifest's content."""
    files: dict[str, dict] = {}
    for f in files_per_rank:
        files.update(f)
    return {"files": files, "total_bytes": sum(f["size"] for f in files.values()),
            "world_size": world_size, "created": time.time()}


class Finalizer:
    """Rank 0: marks uploaded checkpoints complete, keeps the index and prunes. Called by rank 0's
    upload thread once every rank's upload is in storage (``complete``), one save at a time.

    The index is read once per attempt and then kept in memory, so a save costs the same number of
    requests at step 1 and at step 500,000: the manifest, the marker, the index, and for each
    checkpoint that falls out (normally one) its marker removed, a ``PRUNED`` note, one listing of
    that directory and one bulk delete."""

    def __init__(self, run: Store, keep_last: int, best_metric: str, log=say, best_mode: str = "min"):
        self.run, self.keep_last, self.best_metric, self.log = run, keep_last, best_metric, log
        self.best_mode = best_mode  # min: lower is better (a loss); max: higher (an accuracy)
        index = read_index(run)
        if index is None:  # a run of an earlier version, or none yet: rebuild from one listing
            index = [{"name": c["name"], "step": c["step"], "complete": True, "metrics": {}}
                     for c in list_checkpoints(run) if c["complete"]]
        else:  # an attempt that died between a marker and the index: take its checkpoint in
            newest = index[-1]["step"] if index else -1
            for name in (run.ls() if run.exists() else []):  # one listing per attempt, not per save
                m = _NAME.match(name)
                if m and int(m.group(1)) > newest and run.exists(f"{name}/{MARKER}"):
                    index.append({"name": name, "step": int(m.group(1)), "complete": True, "metrics": {}})
            index.sort(key=lambda e: e["step"])
        self.index = index

    def latest(self) -> dict | None:
        """The newest complete checkpoint of the index (its marker checked: one request)."""
        return _latest_in(self.run, self.index)

    def complete(self, entry: dict, files_per_rank: list[dict], world_size: int) -> None:
        """Every rank's files are in storage: manifest, marker, index, then pruning (whose failure
        only postpones it to the next save: the new checkpoint is complete either way)."""
        t0 = time.perf_counter()
        manifest = build_manifest(files_per_rank, world_size)
        self.run.write(f"{entry['name']}/manifest.json", json.dumps(manifest, indent=1).encode())
        entry = dict(entry, bytes=manifest["total_bytes"])
        self.finalize(entry)
        try:
            removed = self.prune()
        except StorageError as e:
            removed = []
            self.log(f"[mae] warning: pruning old checkpoints failed, retried at the next save: {e}")
        self.log(f"[mae] checkpoint {self.run.uri_of(entry['name'])} complete "
                 f"({entry['bytes'] / 2**20:.1f} MiB; finalized in {time.perf_counter() - t0:.1f}s)"
                 + (f"; removed {', '.join(removed)}" if removed else ""))

    def finalize(self, entry: dict) -> None:
        self.run.write(f"{entry['name']}/{MARKER}", b"ok\n")  # after every rank's upload: now it counts
        self.index = [e for e in self.index if e["step"] != entry["step"]] + [entry]
        self.index.sort(key=lambda e: e["step"])
        self._write_index()

    def best(self) -> dict | None:
        """The complete checkpoint with the best ``best_metric`` (ties: the earliest)."""
        scored = [e for e in self.index if e.get("complete")
                  and isinstance(e.get("metrics", {}).get(self.best_metric), (int, float))]
        if not scored:
            return None
        pick = max if self.best_mode == "max" else min
        return pick(scored, key=lambda e: e["metrics"][self.best_metric])

    def keep(self) -> set[int]:
        complete = [e for e in self.index if e.get("complete")]
        keep = {e["step"] for e in complete[-self.keep_last:]}
        best = self.best()
        if best is not None:
            keep.add(best["step"])
        return keep

    def prune(self) -> list[str]:
        keep = self.keep()
        gone = [e for e in self.index if e["step"] not in keep]
        for e in gone:
            name = e["name"]
            self.run.rm([f"{name}/{MARKER}"])  # first: never a half-deleted "complete" checkpoint
            # Ray Train's run snapshot still lists this directory and refuses to resume a run whose
            # checkpoints vanished: the note stays, and is written before any file goes.
            self.run.write(f"{name}/{PRUNED}", b"pruned: not among the last/best checkpoints kept\n")
            self.run.rm([f"{name}/{n}" for n in self.run.ls(name) if n != PRUNED])
        if gone:
            self.index = [e for e in self.index if e["step"] in keep]
            self._write_index()
        return [e["name"] for e in gone]

    def _write_index(self) -> None:
        """The index, the best checkpoint marked (``"best": true``) for `mae ckpt` and readers."""
        best = self.best()
        for e in self.index:
            e.pop("best", None)
            if best is not None and e["step"] == best["step"]:
                e["best"] = True
        self.run.write(INDEX, json.dumps(self.index, indent=1).encode())


# ---------------------------------------------------------------------------- load
def dcp_reader(ckpt: Store):
    """A DCP storage reader straight on the checkpoint directory: each rank reads only the byte
    ranges of the shards it needs (no download of the whole checkpoint). Its ``.metadata`` is
    unpickled through an allowlist (jobs.core.safeload): a writer of the bucket runs no code here."""
    from jobs.core.safeload import SafeFileSystemReader, SafeFsspecReader
    if ckpt.uri.scheme == "file":
        return SafeFileSystemReader(ckpt.path, where=str(ckpt.uri))
    return SafeFsspecReader(str(ckpt.uri), where=str(ckpt.uri), **fsspec_options(ckpt.uri))


def _check_metadata(ckpt: Store) -> None:
    if not ckpt.exists(METADATA):
        raise StorageError(f"{ckpt}: no DCP {METADATA}: a checkpoint of an earlier version (with "
                           f"{LEGACY_METADATA}); rename that file to {METADATA} in storage to resume it")


def _read_state(model, optimizer, ckpt: Store, load_optimizer: bool, *, no_dist: bool = False):
    """Model and optimizer state read from ``ckpt`` into state dicts of this rank's own layout
    (resharded by DCP) -> (model state, optimizer state: as read, or the optimizer's own when
    ``load_optimizer`` is false). The metadata is allowlisted and the non-tensor entries
    (param_groups) read with weights_only: a refused checkpoint is one CheckpointRefused line,
    before any collective."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from jobs.core import safeload
    _check_metadata(ckpt)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd} if load_optimizer else {"model": model_sd}
    safeload.load(state, dcp_reader(ckpt), no_dist=no_dist)
    return state["model"], optim_sd


def replicated(model) -> bool:
    """Every rank holds the whole model (DDP, or a plain module): no parameter is a DTensor shard."""
    from torch.distributed.tensor import DTensor
    return not any(isinstance(p, DTensor) for p in model.parameters())


def _read_once_and_broadcast(model, optimizer, ckpt: Store, load_optimizer: bool, group=None) -> None:
    """DDP: rank 0 reads model and optimizer state from storage (all of it, once) and broadcasts it
    to every rank's replica. A failure to read (a refused or missing checkpoint, a storage error) is
    raised on every rank, as the same one line."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from jobs.core.safeload import CheckpointRefused
    first = dist.get_rank() == 0
    model_sd, optim_sd, failed = {}, {}, None
    if first:
        try:
            model_sd, optim_sd = _read_state(model, optimizer, ckpt, load_optimizer, no_dist=True)
        except BaseException as e:  # noqa: BLE001 - re-raised below, on every rank
            failed = e
    box = [None if failed is None else (type(failed).__name__, str(failed))]
    dist.broadcast_object_list(box, src=0, group=group)
    if box[0] is not None:
        if failed is not None:
            raise failed
        kind, msg = box[0]
        raise {"CheckpointRefused": CheckpointRefused, "StorageError": StorageError}.get(kind, RuntimeError)(
            msg if kind in ("CheckpointRefused", "StorageError") else f"rank 0 could not read {ckpt}: {kind}: {msg}")
    # each tensor from rank 0 (in place there: the state dicts hold its own parameters)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, model_sd, options=opts)
    if load_optimizer:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)


def load_into(model, optimizer, ckpt: Store, *, rank: int, load_optimizer: bool = True,
              restore_rng: bool = True, read_once: bool | None = None, group=None) -> bool:
    """Collective: load (and reshard) model and optimizer state from storage; restore this rank's
    RNG when asked and the checkpoint has it. Returns whether the RNG was restored.

    What each rank reads: a sharded model (FSDP2, HSDP) reads only the byte ranges of its shards;
    a replicated one (DDP: ``read_once=None`` tells them apart) is read by rank 0 alone and
    broadcast, once per run instead of once per rank (``read_once=False``: every rank reads).
    ``group``: where rank 0's failure to read is told to the others (a CPU group under NCCL)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import set_state_dict

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if read_once is None:
        read_once = replicated(model)
    if read_once and world > 1:
        _read_once_and_broadcast(model, optimizer, ckpt, load_optimizer, group)
    else:
        model_sd, optim_sd = _read_state(model, optimizer, ckpt, load_optimizer)
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    if restore_rng:
        raw = ckpt.read_if_exists(f"rng_rank{rank}.pt")
        if raw is not None:  # plain tensors and numbers: a writable bucket cannot run code here
            set_rng_state(torch.load(io.BytesIO(raw), weights_only=True))
            return True
    return False
