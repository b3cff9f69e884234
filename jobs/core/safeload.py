"""Reading checkpoints as data, never as code.

torch's DCP unpickles a checkpoint's ``.metadata`` with plain ``pickle`` (``FileSystemReader.
read_metadata``) and its non-tensor entries with ``torch.load(weights_only=False)``
(``DefaultLoadPlanner.load_bytes``; this project's are the optimizer's param_groups: floats,
bools, None, tuples, lists of names). Either would run whatever a writer of the bucket planted, on
every rank that resumes, at ``model.init_from`` and at ``mae ckpt export``. Here:

- :class:`SafeFileSystemReader` / :class:`SafeFsspecReader` unpickle ``.metadata`` with an
  unpickler that resolves only the classes DCP metadata holds (:data:`METADATA_GLOBALS`), and
  check that its shard files lie inside the checkpoint;
- :class:`SafeLoadPlanner` reads the non-tensor entries with ``torch.load(weights_only=True)``;
- :func:`load` is ``dcp.load`` with both, reading the metadata before any collective, so that a
  refusal is one :class:`CheckpointRefused` line (a ``UserError``) on every rank, not DCP's
  per-rank traceback dump.

Tensor shards were already read with ``weights_only=True`` by DCP itself.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from jobs.core.common import UserError
from pipeline import private_api

FsspecReader = private_api.dcp_fsspec_reader()  # torch's own, not re-exported

_FIX = "restore the checkpoint from a trusted copy (or delete it), then retry"

# Every global a DCP .metadata of this project's checkpoints pickles, found by unpickling (with a
# recording find_class) the metadata of real checkpoints written by jobs.core.checkpoint.write_local
# with torch 2.14: model + fused AdamW and model + plain AdamW, unwrapped in one process, DDP,
# FSDP2 and HSDP over 2 ranks. Plain containers (dict, list, tuple, str, numbers, None) need no
# global. Dtypes are allowed as a family (a bf16 tensor pickles torch.bfloat16 as float32 does),
# and pathlib's private module name of Python 3.13+ for the same class.
METADATA_GLOBALS = frozenset(
    {("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties")}
    | private_api.DCP_PRIVATE_PICKLE_GLOBALS                           # torch's private names (checked there)
    | {("torch", "Size"),                                              # shapes, chunk offsets
       ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath")}     # storage_meta.checkpoint_id
    | {("torch", n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)}
)


class CheckpointRefused(UserError):
    """A checkpoint whose metadata or entries hold something a checkpoint never holds."""


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only :data:`METADATA_GLOBALS`: anything else (a function to call, a class with a
    ``__reduce__`` of its own) is refused before it can be called."""

    def __init__(self, f, where: str):
        super().__init__(f)
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_GLOBALS:
            return super().find_class(module, name)
        raise CheckpointRefused(f"checkpoint {self.where}: .metadata holds a pickled object of class "
                                f"{module}.{name}, which a checkpoint never holds: refusing to load it "
                                f"(it could run code); {_FIX}")

    def persistent_load(self, pid):
        raise CheckpointRefused(f"checkpoint {self.where}: .metadata holds a persistent id, which a "
                                f"checkpoint never holds: refusing to load it; {_FIX}")


_SHARD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # DCP's own: __0_0.distcp


def unpickle_metadata(f, where: str) -> Metadata:
    """A DCP ``.metadata`` stream -> its Metadata, allowlisted and checked (:class:`CheckpointRefused`)."""
    try:
        md = _MetadataUnpickler(f, where).load()
    except CheckpointRefused:
        raise
    except Exception as e:  # noqa: BLE001 - truncated, garbage, another format: one line
        raise CheckpointRefused(f"checkpoint {where}: not a DCP .metadata file ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}): refusing to load it; {_FIX}") from None
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise CheckpointRefused(f"checkpoint {where}: not a DCP .metadata file (it holds a "
                                f"{type(md).__name__}): refusing to load it; {_FIX}")
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not _SHARD_NAME.match(rel):
            raise CheckpointRefused(f"checkpoint {where}: .metadata names a shard file {rel!r} outside the "
                                    f"checkpoint directory: refusing to load it; {_FIX}")
    return md


class _SafeMetadata:
    """``read_metadata`` through :func:`unpickle_metadata`; the global one is read once per reader
    (:func:`load` reads it before ``dcp.load``, which then asks again)."""

    where: str
    _metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        md = self._metadata if rank is None else None
        if md is None:
            with self.fs.create_stream(private_api.dcp_metadata_path(self, rank), "rb") as f:
                md = unpickle_metadata(f, self.where)
            if rank is None:
                self._metadata = md
        if getattr(md, "storage_meta", None) is None:  # as torch's read_metadata
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def reset(self, checkpoint_id=None) -> None:
        super().reset(checkpoint_id)
        if checkpoint_id:
            self._metadata = None

    def read_data(self, plan, planner):
        """DCP's read, each file's items taken in offset order (torch takes them in the plan's)."""
        return super().read_data(private_api.dcp_plan_in_file_order(self, plan), planner)


class SafeFileSystemReader(_SafeMetadata, FileSystemReader):
    def __init__(self, path, *, where: str | None = None, **kw):
        super().__init__(path, **kw)
        self.where = where or str(path)


class SafeFsspecReader(_SafeMetadata, FsspecReader):
    """On object storage, each rank fetches only the byte ranges of the items it reads.

    torch opens each file as an fsspec file whose readahead cache (50 MiB on S3) fetches from the
    first byte read to far past it, and reads the items in the plan's order, refetching after
    every backward seek: a 2-rank resume read 2.4x (FSDP2) and 3.9x (DDP) the checkpoint, and an
    FSDP rank that needs one small replicated entry (an optimizer step) of another rank's file
    fetched the rest of that file. Here the items of a file are read in offset order through
    :class:`_SpanFile`: its ranges, neighbours merged, one ranged request each."""

    def __init__(self, path, *, where: str | None = None, **kw):
        super().__init__(path, **kw)
        self.where = where or str(path)

    def read_data(self, plan, planner):
        plan = private_api.dcp_plan_in_file_order(self, plan)
        spans = {path: merge_ranges(r) for path, r in private_api.dcp_file_ranges(self, plan).items()}
        fs = private_api.dcp_fsspec_of(self)

        @contextlib.contextmanager
        def open_stream(path):
            f = _SpanFile(fs, path, spans.get(path, []))
            try:
                yield f
            finally:
                f.close()

        with private_api.dcp_streams_from(self, open_stream):
            return FsspecReader.read_data(self, plan, planner)  # torch's, on the sorted plan


FETCH_GAP = 16 << 10     # ranges of a file closer than this are fetched in one request
FETCH_MAX = 64 << 20     # at most this much per request (and held per open file)


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """A file's (offset, length) ranges -> sorted (start, end) spans to fetch: neighbours closer than
    :data:`FETCH_GAP` merged while the span stays within :data:`FETCH_MAX` (a longer range is a span
    of its own), so that every range lies inside one span."""
    spans: list[list[int]] = []
    for off, n in sorted(set(ranges)):
        end = off + n
        if spans and off - spans[-1][1] <= FETCH_GAP and max(end, spans[-1][1]) - spans[-1][0] <= FETCH_MAX:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([off, end])
    return [(a, b) for a, b in spans]


class _SpanFile(io.RawIOBase):
    """A remote file read through the spans a rank needs: a span is fetched with one ranged request
    when a read first falls inside it and kept until a read falls in another (reads come in offset
    order); a read inside no span (none is expected) is fetched as asked."""

    def __init__(self, fs, path: str, spans: list[tuple[int, int]]):
        super().__init__()
        self.fs, self.path, self.spans = fs, path, spans
        self.pos, self.start, self.buf = 0, 0, b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self.pos = offset
        elif whence == io.SEEK_CUR:
            self.pos += offset
        else:  # DCP's views turn SEEK_END into SEEK_SET
            raise io.UnsupportedOperation("seek from the end")
        return self.pos

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise io.UnsupportedOperation("read to the end")  # DCP reads within an item's length
        if size == 0:
            return b""
        end = self.pos + size
        if not (self.start <= self.pos and end <= self.start + len(self.buf)):
            lo, hi = next(((a, b) for a, b in self.spans if a <= self.pos and end <= b), (self.pos, end))
            self.buf, self.start = b"", lo
            self.buf = self.fs.cat_file(self.path, start=lo, end=hi)
        out = self.buf[self.pos - self.start:end - self.start]
        self.pos += len(out)
        return out

    def readinto(self, b) -> int:
        data = self.read(len(b))
        memoryview(b).cast("B")[:len(data)] = data
        return len(data)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor entries with ``torch.load(weights_only=True)``."""

    def __init__(self, where: str, **kw):
        super().__init__(**kw)
        self.where = where

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            m = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"a pickled object of class {m.group(1)}" if m else "an object that is not plain data"
            raise CheckpointRefused(f"checkpoint {self.where}: its entry {fqn} holds {what}, which a checkpoint "
                                    f"never holds: refusing to load it (it could run code); {_FIX}") from None
        if self.flatten_state_dict:
            private_api.dcp_set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def load(state_dict: dict, storage_reader, *, no_dist: bool = False) -> None:
    """``dcp.load`` of ``state_dict`` through a safe reader and :class:`SafeLoadPlanner`: a refused
    checkpoint raises :class:`CheckpointRefused` on every rank (the metadata is read before any
    collective; a refused entry comes out of DCP's per-rank exception as itself)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    if not isinstance(storage_reader, _SafeMetadata):
        raise TypeError("safeload.load needs a SafeFileSystemReader or SafeFsspecReader")
    storage_reader.read_metadata()
    try:
        dcp.load(state_dict, storage_reader=storage_reader, planner=SafeLoadPlanner(storage_reader.where),
                 no_dist=no_dist)
    except CheckpointException as e:
        refused = [exc for exc, _ in e.failures.values() if isinstance(exc, CheckpointRefused)]
        if refused:
            raise refused[0] from None
        raise
