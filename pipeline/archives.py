"""Images inside tar archives, read where they lie: ImageNet's train tar (a tar of per-class
tars), its val tar (flat), webdataset shards (``KEY.jpg`` + ``KEY.cls``) and plain tars of images.

Listing reads the member headers only: :mod:`tarfile` on a seekable fsspec file that fetches
``HEADER_READ`` bytes at a time, so that each header costs one small range read and the data
between headers is skipped, never downloaded. A tar inside a tar (ImageNet's ``n01440764.tar``
...) is listed in place the same way: its members' offsets are the outer offset plus theirs. An
image is then one range read of (archive, offset, size), by the task that writes its shard.

Also here: the label files that ImageNet's validation images come with.
"""

from __future__ import annotations

import csv
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .sources import IMAGE_SUFFIXES
from .storage import StorageError, storage_errors, with_retries

ARCHIVE = ".tar"
COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
HEADER_READ = 16 * 1024  # bytes per header read: the header, and small members and headers after it
LIST_THREADS = 32        # archives (and inner tars) listed at once: one small request each at a time


@dataclass(frozen=True)
class Member:
    archive: str  # the archive object's path (the fsspec form: bucket/key, or a local path)
    name: str     # its path inside; in a tar of tars "INNER/NAME", INNER the inner tar's name less .tar
    offset: int   # where its bytes start in the archive object
    size: int
    label: int | None = None  # a webdataset sample's KEY.cls


def is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE)


def check_not_compressed(where: str, path: str) -> None:
    if path.lower().endswith(COMPRESSED):
        raise StorageError(f"{where}: {path.rsplit('/', 1)[-1]} is a compressed tar, which cannot be read by "
                           "byte ranges: decompress it to a plain .tar first")


def wds_key(name: str) -> str:
    """A webdataset sample's key: the member's path up to the first dot of its file name."""
    d, _, base = name.rpartition("/")
    return f"{d}/{base.split('.', 1)[0]}" if d else base.split(".", 1)[0]


def list_images(fs, archives: list[tuple[str, int]], *, retries: int = 4,
                threads: int = LIST_THREADS) -> list[Member]:
    """The image members (by suffix) of ``archives`` [(path, size)], inner ``.tar`` members listed
    in place; each with its webdataset label (``KEY.cls`` beside ``KEY.jpg``) where there is one.
    In archive order, then by position. Other members (``.json``, ``.txt``, ...) are not images.
    A read error is retried (``with_retries``); a damaged archive is one line naming it."""
    with ThreadPoolExecutor(threads) as pool:
        outer = list(pool.map(lambda a: _scan(fs, a[0], 0, a[1], "", retries), archives))
        tars = [m for members in outer for m in members if is_archive(m.name)]
        inner = dict(zip(tars, pool.map(lambda m: _scan(fs, m.archive, m.offset, m.size,
                                                        m.name[:-len(ARCHIVE)] + "/", retries), tars)))
    out = []
    for members in outer:
        out += _images([m for m in members if not is_archive(m.name)])
        out += [i for m in members if is_archive(m.name) for i in _images(inner[m])]
    return out


def _images(members: list[Member]) -> list[Member]:
    """The images of one tar's listing, each with its sample's ``.cls`` label."""
    labels = {wds_key(m.name): m.label for m in members if m.label is not None}
    return [Member(m.archive, m.name, m.offset, m.size, labels.get(wds_key(m.name)))
            for m in members if m.name.lower().endswith(IMAGE_SUFFIXES)]


def _scan(fs, archive: str, start: int, size: int, prefix: str, retries: int) -> list[Member]:
    """The regular members of the tar at bytes [start, start + size) of ``archive``, headers only
    (and the contents of ``.cls`` members, a few bytes that come with their header's read)."""
    where = f"{archive}:{prefix.rstrip('/')}.tar" if prefix else archive

    def once():
        with storage_errors(where), fs.open(archive, "rb", block_size=HEADER_READ, cache_type="readahead") as f:
            w = _Window(f, start, size)
            try:
                out = []
                with tarfile.open(fileobj=w, mode="r:") as t:
                    for ti in t:
                        if not ti.isreg():
                            continue
                        if ti.offset_data + ti.size > size:
                            raise tarfile.ReadError(f"{ti.name} ends past the end of the archive")
                        label = _cls(w, ti) if ti.name.endswith(".cls") else None
                        out.append(Member(archive, prefix + ti.name, start + ti.offset_data, ti.size, label))
                    w.seek(t.offset)  # tarfile stops quietly at a damaged header after the first:
                    if w.read(tarfile.BLOCKSIZE).strip(b"\0"):  # the end must be zeros or nothing
                        raise tarfile.ReadError(f"a damaged header at byte {start + t.offset}")
                return out, None
            except (tarfile.TarError, ValueError) as e:  # not a read error: never retried
                return None, e
    out, err = with_retries(once, retries=retries)
    if isinstance(err, ValueError):
        raise StorageError(f"{where}: {err}")
    if err is not None:
        raise StorageError(f"{where}: not a readable tar ({err}): the archive is truncated, corrupt or "
                           "compressed; check it (tar -tf) or download it again")
    return out


def _cls(w, ti: tarfile.TarInfo) -> int:
    w.seek(ti.offset_data)
    text = w.read(min(ti.size, 64)).decode("utf-8", "replace").strip()
    if not text.isdigit():
        raise ValueError(f"{ti.name} holds {text[:20]!r}, not a class index: a .cls member must hold "
                         "the class index as text (e.g. 17)")
    return int(text)


class _Window:
    """Bytes [start, start + size) of a seekable file, as a file of their own (for tarfile)."""

    def __init__(self, f, start: int, size: int):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, pos if whence == 0 else self.pos + pos if whence == 1 else self.size + pos)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        self.f.seek(self.start + self.pos)
        data = self.f.read(end - self.pos)
        self.pos += len(data)
        return data


def read_member(fs, archive: str, offset: int, size: int) -> bytes:
    """One member's bytes: one range read (none for an empty member: a store refuses an empty range)."""
    return fs.cat_file(archive, start=offset, end=offset + size) if size else b""


# ---------------------------------------------------------------------------- label files
def label_stem(name: str) -> str:
    """What a label file and a listing are matched on: the file name, less an image suffix
    (Kaggle's ``ILSVRC2012_val_00000001`` is the file ``ILSVRC2012_val_00000001.JPEG``)."""
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if base.lower().endswith(IMAGE_SUFFIXES) else base


def parse_labels(text: str, where: str) -> dict[str, str | int]:
    """A label file -> {file name stem: class}. Accepted: Kaggle's ``LOC_val_solution.csv``
    (header ``ImageId,PredictionString``, the prediction string starting with the wnid), and
    lines of ``FILENAME CLASS`` or ``FILENAME<TAB>CLASS``. A class written as an integer is a
    class index (as in Caffe's ``val.txt``); blank lines and ``#`` comments are skipped."""
    lines = text.lstrip("\ufeff").splitlines()
    out: dict[str, str | int] = {}
    if lines and lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        for n, row in enumerate(csv.reader(lines[1:]), start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2 or not row[1].split():
                raise StorageError(f"{where}: line {n} has no prediction string: a LOC_val_solution.csv line "
                                   "is ImageId,WNID x y x y ...")
            out[label_stem(row[0].strip())] = row[1].split()[0]
    else:
        for n, line in enumerate(lines, start=1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            parts = [p.strip() for p in s.split("\t")] if "\t" in s else s.split()
            if len(parts) != 2 or not all(parts):
                hint = (" (the devkit's ILSVRC2012_validation_ground_truth.txt numbers classes in its own "
                        "order: use LOC_val_solution.csv)" if len(parts) == 1 and s.isdigit() else "")
                raise StorageError(f"{where}: line {n} is {s[:60]!r}, not 'FILENAME CLASS': give "
                                   f"LOC_val_solution.csv or lines of 'FILENAME CLASS'{hint}")
            out[label_stem(parts[0])] = parts[1]
    if not out:
        raise StorageError(f"{where}: no labels in the file: give LOC_val_solution.csv or lines of "
                           "'FILENAME CLASS'")
    if all(c.isdigit() for c in out.values()):
        return {k: int(c) for k, c in out.items()}
    return out
