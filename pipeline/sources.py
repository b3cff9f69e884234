"""What a data URI holds: prepared Parquet shards (with a manifest) or a folder of images.

Prepared datasets (``mae prepare``) look like::

    DST/manifest.json
    DST/train-00000-of-00004.parquet   columns: key (string), image (binary), label (int32, nullable)
    DST/val-00000-of-00001.parquet

A plain folder (or bucket prefix) of images is accepted too; the ImageFolder layout
``class_name/file.jpg`` gives integer labels (classes sorted by name), a flat folder none.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field

from .storage import StorageError, URI, list_files, parse_uri, read_bytes, storage_errors

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
MANIFEST = "manifest.json"


@dataclass
class SourceInfo:
    uri: str
    kind: str                       # "parquet" or "images"
    files: list[str]                # paths without scheme (what pyarrow/fsspec filesystems take)
    classes: list[str] | None = None
    num_rows: int | None = None     # known for prepared shards
    manifest: dict = field(default_factory=dict)

    @property
    def labeled(self) -> bool:
        return bool(self.classes)


def split_of(key: str, seed: int, val_fraction: float) -> str:
    """Seeded, stable train/val assignment by a hash of the key (independent of listing order)."""
    if val_fraction <= 0:
        return "train"
    h = zlib.crc32(f"{seed}:{key}".encode()) / 2**32
    return "val" if h < val_fraction else "train"


def relative_key(root: URI, path: str) -> str:
    return path[len(root.path.rstrip("/")) + 1:] if path.startswith(root.path.rstrip("/") + "/") else path


def imagefolder_classes(root: URI, paths: list[str]) -> list[str] | None:
    """Sorted class names if every image sits exactly one folder below the root, else None."""
    rels = [relative_key(root, p) for p in paths]
    if rels and all(r.count("/") == 1 for r in rels):
        return sorted({r.split("/", 1)[0] for r in rels})
    return None


def label_of(rel_key: str, class_index: dict[str, int] | None) -> int | None:
    if not class_index:
        return None
    return class_index.get(rel_key.split("/", 1)[0])


def read_manifest(uri: str | URI) -> dict | None:
    u = uri if isinstance(uri, URI) else parse_uri(uri)
    m = u.join(MANIFEST)
    try:
        data = read_bytes(m)
    except StorageError as e:
        if "not found" in str(e):
            return None
        raise
    with storage_errors(m):
        return json.loads(data)


def resolve(uri: str, split: str = "train", val_fraction: float = 0.0, seed: int = 0) -> SourceInfo:
    """Find what to read under ``uri`` for ``split``. One clear error when there is nothing."""
    u = parse_uri(uri)
    manifest = read_manifest(u)
    if manifest is not None:
        splits = manifest.get("splits", {})
        if split not in splits:
            raise StorageError(f"{uri}: the prepared dataset has no {split!r} split "
                               f"(it has {sorted(splits)}); prepare with --val-fraction or pick another split")
        s = splits[split]
        files = [u.join(f).path for f in s["files"]]
        return SourceInfo(str(uri), "parquet", files, manifest.get("classes") or None,
                          s.get("count"), manifest)
    listed = list_files(u)
    parquet = [p for p, _ in listed if p.endswith(".parquet")]
    if parquet:
        return SourceInfo(str(uri), "parquet", parquet)
    images = [p for p, _ in listed if p.lower().endswith(IMAGE_SUFFIXES)]
    if not images:
        raise StorageError(f"{uri}: no images or Parquet shards found (empty prefix?): "
                           f"check the path; images need one of {', '.join(IMAGE_SUFFIXES[:5])}, ...")
    classes = imagefolder_classes(u, images)
    if val_fraction > 0:
        images = [p for p in images if split_of(relative_key(u, p), seed, val_fraction) == split]
    return SourceInfo(str(uri), "images", images, classes, len(images))

