"""``mae prepare SRC DST``: shard a folder/prefix of images once into Parquet + a manifest.

The plan (which file goes to which shard) is made on the driver from the sorted listing, so a
rerun gives the same shards; the shards are validated and written in parallel by Ray Data tasks
(one per shard, with a progress bar); the manifest is written last, by the driver, and is what
readers look for: a half-prepared DST has no manifest.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
from dataclasses import asdict, dataclass

from .decode import DEFAULT_MAX_PIXELS, SkipImage, decode, open_image
from .sources import MANIFEST, imagefolder_classes, label_of, relative_key, split_of
from .storage import StorageError, fsspec_fs, list_files, parse_uri, storage_errors, write_bytes

FORMAT = "mae-shards/1"


@dataclass
class PrepareConfig:
    src: str
    dst: str
    shard_size_mb: float = 128.0
    val_fraction: float = 0.0
    seed: int = 0
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    rows_per_row_group: int = 64  # ~5 MB of ImageNet JPEGs: fine-grained read units


def plan_shards(files: list[tuple[str, int]], root_uri: str, cfg: PrepareConfig) -> list[dict]:
    """Sorted listing -> [{"split", "name", "items": [[path, key], ...]}], deterministic."""
    root = parse_uri(root_uri)
    target = max(1, int(cfg.shard_size_mb * 1024 * 1024))
    by_split: dict[str, list[list]] = {}
    for path, size in files:
        key = relative_key(root, path)
        by_split.setdefault(split_of(key, cfg.seed, cfg.val_fraction), []).append([path, key, size])
    shards = []
    for split in sorted(by_split):
        groups, cur, cur_bytes = [], [], 0
        for path, key, size in by_split[split]:
            if cur and cur_bytes + size > target:
                groups.append(cur)
                cur, cur_bytes = [], 0
            cur.append([path, key])
            cur_bytes += size
        if cur:
            groups.append(cur)
        for i, items in enumerate(groups):
            shards.append({"split": split, "name": f"{split}-{i:05d}-of-{len(groups):05d}.parquet",
                           "items": items})
    return shards


def validate(data: bytes, max_pixels: int) -> None:
    """Header, size guard and a full (DCT-reduced for JPEG) decode. Raises SkipImage."""
    img = open_image(data, max_pixels)
    decode(data, need=(32, 32), max_pixels=max_pixels, img=img)


def write_shard(row: dict, *, src: str, dst: str, class_index: dict | None, max_pixels: int,
                rows_per_row_group: int) -> dict:
    """One Ray Data task: read, validate and write one shard. Returns its counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shard = json.loads(row["shard"])
    fs, _ = fsspec_fs(src)
    keys, images, labels, skipped = [], [], [], []
    for path, key in shard["items"]:
        try:
            with storage_errors(path):
                data = fs.cat_file(path)
            validate(data, max_pixels)
        except SkipImage as e:
            skipped.append({"key": key, "reason": e.reason})
            continue
        except StorageError as e:
            skipped.append({"key": key, "reason": "unreadable", "detail": str(e)})
            continue
        keys.append(key)
        images.append(data)
        labels.append(label_of(key, class_index))
    table = pa.table({"key": pa.array(keys, pa.string()), "image": pa.array(images, pa.binary()),
                      "label": pa.array(labels, pa.int32())})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=rows_per_row_group, compression="none")
    out = parse_uri(dst).join(shard["name"])
    write_bytes(out, buf.getvalue())
    return {"result": json.dumps({"split": shard["split"], "name": shard["name"], "count": len(keys),
                                  "bytes": buf.tell(), "skipped": skipped})}


@dataclass
class Plan:
    cfg: PrepareConfig
    files: list
    classes: list | None
    shards: list[dict]


def plan(cfg: PrepareConfig) -> Plan:
    """Everything that can fail on bad input, checked before any Ray work starts."""
    src, dst = parse_uri(cfg.src), parse_uri(cfg.dst)
    if not 0 <= cfg.val_fraction < 1:
        raise ValueError(f"--val-fraction {cfg.val_fraction}: must be in [0, 1)")
    files = [(p, s) for p, s in list_files(src) if not p.rsplit("/", 1)[-1].startswith(".")]
    if not files:
        raise StorageError(f"{cfg.src}: no files found (empty prefix?): check the source path")
    existing = list_files(dst) if _exists(dst) else []
    if existing:
        if not cfg.overwrite:
            raise StorageError(f"{cfg.dst}: not empty ({len(existing)} files): choose an empty "
                               "destination or pass --overwrite")
    classes = imagefolder_classes(src, [p for p, _ in files])
    return Plan(cfg, files, classes, plan_shards(files, str(src), cfg))


def prepare(cfg: PrepareConfig, progress: bool = True, the_plan: Plan | None = None) -> dict:
    """Run the whole prepare; returns the manifest (also written to DST/manifest.json)."""
    import ray.data

    pl = the_plan or plan(cfg)
    src, dst = parse_uri(cfg.src), parse_uri(cfg.dst)
    files, classes, shards = pl.files, pl.classes, pl.shards
    if cfg.overwrite and _exists(dst) and list_files(dst):
        fs, p = fsspec_fs(dst)
        with storage_errors(dst):
            fs.rm(p, recursive=True)
    class_index = {c: i for i, c in enumerate(classes)} if classes else None

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ds = ray.data.from_items([{"shard": json.dumps(s)} for s in shards], override_num_blocks=len(shards))
    ds = ds.map(write_shard, fn_kwargs=dict(src=str(src), dst=str(dst), class_index=class_index,
                                            max_pixels=cfg.max_pixels,
                                            rows_per_row_group=cfg.rows_per_row_group), num_cpus=1)
    results = sorted((json.loads(r["result"]) for r in ds.take_all()), key=lambda r: r["name"])

    splits: dict[str, dict] = {}
    skipped = []
    for r in results:
        s = splits.setdefault(r["split"], {"files": [], "count": 0, "bytes": 0})
        s["files"].append(r["name"])
        s["count"] += r["count"]
        s["bytes"] += r["bytes"]
        skipped.extend(r["skipped"])
    skipped.sort(key=lambda d: d["key"])
    reasons: dict[str, int] = {}
    for d in skipped:
        reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
    manifest = {
        "format": FORMAT,
        "source": str(src),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": classes or [],
        "counts": {"listed": len(files), "ok": sum(s["count"] for s in splits.values()),
                   "skipped": len(skipped), "skipped_by_reason": reasons},
        "splits": splits,
        "skipped": skipped,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("src", "dst", "overwrite")},
    }
    write_bytes(dst.join(MANIFEST), json.dumps(manifest, indent=1).encode())  # last: the marker
    return manifest


def _exists(u) -> bool:
    fs, p = fsspec_fs(u)
    with storage_errors(u):
        if u.scheme != "file" and "/" not in p.strip("/"):
            return True  # a bare bucket: listing tells (and surfaces NoSuchBucket)
        return fs.exists(p)
