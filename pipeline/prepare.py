"""``mae prepare SRC DST``: shard a folder/prefix of images once into Parquet + a manifest.

The plan (which file goes to which shard) is made on the driver from the sorted listing and a
seeded permutation, so a rerun gives the same shards, each holding every class in its share; the
shards are validated and written in parallel by Ray Data tasks (one per shard, with a progress bar); the manifest is written last, by the driver, and is what
readers look for: a half-prepared DST has no manifest.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from .cluster import check_visible_to_cluster
from .decode import DEFAULT_MAX_PIXELS, SkipImage, decode, open_image
from .sources import MANIFEST, imagefolder_classes, label_of, relative_key, split_of
from .storage import StorageError, fsspec_fs, list_files, parse_uri, storage_errors, with_retries, write_bytes

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
    shared_fs: bool = False  # local src/dst are on a filesystem every node of the cluster mounts
    probe_images: int = 2048  # per split: a class-balanced sample for the k-NN probe (probe-SPLIT.parquet)
    read_retries: int = 4  # retries (with backoff) of a failed read, before the job fails
    rows_per_row_group: int = 64  # ~5 MB of ImageNet JPEGs: fine-grained read units


def plan_shards(files: list[tuple[str, int]], root_uri: str, cfg: PrepareConfig) -> list[dict]:
    """Sorted listing -> [{"split", "name", "items": [[path, key], ...]}], deterministic: rows in a
    seeded permutation per split, cut into shards of about ``shard_size_mb``."""
    root = parse_uri(root_uri)
    target = max(1, int(cfg.shard_size_mb * 1024 * 1024))
    by_split: dict[str, list[list]] = {}
    for path, size in files:
        key = relative_key(root, path)
        by_split.setdefault(split_of(key, cfg.seed, cfg.val_fraction), []).append([path, key, size])
    shards = []
    for split in sorted(by_split):
        # Rows spread over the shards in a seeded random order (the same on every rerun): sorted
        # keys would give an ImageFolder one class per shard, and a read unit or a micro-batch a
        # handful of classes; the official code draws from a global permutation.
        rows = by_split[split]
        order = np.random.default_rng([cfg.seed, zlib.crc32(split.encode())]).permutation(len(rows))
        groups, cur, cur_bytes = [], [], 0
        for path, key, size in (rows[i] for i in order):
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


def plan_probe(files: list[tuple[str, int]], root_uri: str, cfg: PrepareConfig, classes: list | None) -> list[dict]:
    """The k-NN probe's images, once, so that a run reads bytes in proportion to the probe images
    it asks for (not the label column of every shard and the images of every shard holding one).

    Per split, up to ``probe_images`` images, classes interleaved in a seeded random order: any
    first n rows are a class-balanced random sample. Labeled (ImageFolder) sources only."""
    if not classes or cfg.probe_images <= 0:
        return []
    import random
    root = parse_uri(root_uri)
    by: dict[str, dict[str, list]] = {}
    for path, _ in files:
        key = relative_key(root, path)
        by.setdefault(split_of(key, cfg.seed, cfg.val_fraction), {}).setdefault(key.split("/", 1)[0], []).append(
            [path, key])
    out = []
    for split in sorted(by):
        rng = random.Random(f"{cfg.seed}:probe:{split}")
        pools = [by[split][c] for c in sorted(by[split])]
        for pool in pools:
            rng.shuffle(pool)
        order = sorted(range(len(pools)), key=lambda _: rng.random())  # which class goes first in a round
        items, depth = [], 0
        while len(items) < cfg.probe_images and any(depth < len(p) for p in pools):
            items += [pools[c][depth] for c in order if depth < len(pools[c])]
            depth += 1
        out.append({"split": split, "name": f"probe-{split}.parquet", "items": items[:cfg.probe_images],
                    "probe": True})
    return out


def validate(data: bytes, max_pixels: int) -> None:
    """Header, size guard and a full (DCT-reduced for JPEG) decode. Raises SkipImage."""
    img = open_image(data, max_pixels)
    decode(data, need=(32, 32), max_pixels=max_pixels, img=img)


def write_shard(row: dict, *, src: str, dst: str, class_index: dict | None, max_pixels: int,
                rows_per_row_group: int, read_retries: int = 4) -> dict:
    """One Ray Data task: read, validate and write one shard. Returns its counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shard = json.loads(row["shard"])
    fs, _ = fsspec_fs(src)
    keys, images, labels, skipped = [], [], [], []
    for path, key in shard["items"]:
        # A read error (not found after the listing, denied, throttled, reset) is not a property of
        # the image: it is retried with backoff, then fails the job; only an image that is itself
        # broken is a skip.
        def read(path=path):
            with storage_errors(path):
                return fs.cat_file(path)
        data = with_retries(read, retries=read_retries)
        try:
            validate(data, max_pixels)
        except SkipImage as e:
            skipped.append({"key": key, "reason": e.reason})
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
                                  "bytes": buf.tell(), "skipped": skipped, "probe": shard.get("probe", False)})}


@dataclass
class Plan:
    cfg: PrepareConfig
    files: list
    classes: list | None
    shards: list[dict]


def check_values(cfg: PrepareConfig) -> None:
    """The settings that are wrong whatever the storage holds (checked by ``mae submit`` too)."""
    if not 0 <= cfg.val_fraction < 1:
        raise ValueError(f"--val-fraction {cfg.val_fraction}: must be in [0, 1)")
    if not cfg.shard_size_mb > 0:
        raise ValueError(f"--shard-size-mb {cfg.shard_size_mb}: must be > 0")


def plan(cfg: PrepareConfig) -> Plan:
    """Everything that can fail on bad input, checked before any Ray work starts."""
    src, dst = parse_uri(cfg.src), parse_uri(cfg.dst)
    check_values(cfg)
    files = [(p, s) for p, s in list_files(src) if not p.rsplit("/", 1)[-1].startswith(".")]
    if not files:
        raise StorageError(f"{cfg.src}: no files found (empty prefix?): check the source path")
    if cfg.overwrite and dst.scheme != "file" and "/" not in dst.path.strip("/"):
        raise StorageError(f"{cfg.dst}: --overwrite would delete the whole bucket: give a prefix "
                           f"(e.g. {dst.scheme}://{dst.bucket}/shards)")
    existing = list_files(dst) if _exists(dst) else []
    if existing:
        if not cfg.overwrite:
            raise StorageError(f"{cfg.dst}: not empty ({len(existing)} files): choose an empty "
                               "destination or pass --overwrite")
    classes = imagefolder_classes(src, [p for p, _ in files])
    return Plan(cfg, files, classes, plan_shards(files, str(src), cfg) + plan_probe(files, str(src), cfg, classes))


def prepare(cfg: PrepareConfig, progress: bool = True, the_plan: Plan | None = None) -> dict:
    """Run the whole prepare; returns the manifest (also written to DST/manifest.json)."""
    import ray.data

    check_visible_to_cluster({"SRC": cfg.src, "DST": cfg.dst}, shared_fs=cfg.shared_fs, setting="--shared-fs")
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
    # A failed task's own exception (not Ray Data's wrapper, whose cause is lost on the way here),
    # so that a StorageError reaches the user as its one line.
    raise_original, ctx.raise_original_map_exception = ctx.raise_original_map_exception, True
    ds = ray.data.from_items([{"shard": json.dumps(s)} for s in shards], override_num_blocks=len(shards))
    ds = ds.map(write_shard, fn_kwargs=dict(src=str(src), dst=str(dst), class_index=class_index,
                                            max_pixels=cfg.max_pixels,
                                            rows_per_row_group=cfg.rows_per_row_group,
                                            read_retries=cfg.read_retries), num_cpus=1)
    try:
        rows = ds.take_all()
    except Exception as e:  # noqa: BLE001 - a task's StorageError, after its retries, as one line
        cause = _storage_error_in(e)
        if cause is None:
            raise
        raise StorageError(f"{cause}; no manifest was written: run again with --overwrite once the "
                           "source reads") from None
    finally:
        ctx.raise_original_map_exception = raise_original
    results = sorted((json.loads(r["result"]) for r in rows), key=lambda r: r["name"])
    manifest = build_manifest(cfg, str(src), files, classes, results)
    write_bytes(dst.join(MANIFEST), json.dumps(manifest, indent=1).encode())  # last: the marker
    return manifest


def build_manifest(cfg: PrepareConfig, src: str, files: list, classes: list | None, results: list[dict]) -> dict:
    """The written shards' results (sorted by name) -> the dataset's manifest: splits, probe files,
    counts, the skipped images with their reasons, and the settings (never SRC/DST credentials)."""
    splits: dict[str, dict] = {}
    probe: dict[str, dict] = {}
    skipped = []
    for r in results:
        if r["probe"]:  # a copy of some images of the split: not counted twice
            probe[r["split"]] = {"file": r["name"], "count": r["count"]}
            continue
        s = splits.setdefault(r["split"], {"files": [], "count": 0, "bytes": 0})
        s["files"].append(r["name"])
        s["count"] += r["count"]
        s["bytes"] += r["bytes"]
        skipped.extend(r["skipped"])
    skipped.sort(key=lambda d: d["key"])
    reasons: dict[str, int] = {}
    for d in skipped:
        reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
    return {
        "format": FORMAT,
        "source": src,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": classes or [],
        "counts": {"listed": len(files), "ok": sum(s["count"] for s in splits.values()),
                   "skipped": len(skipped), "skipped_by_reason": reasons},
        "splits": splits,
        "probe": probe,
        "skipped": skipped,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("src", "dst", "overwrite")},
    }


def _storage_error_in(e: BaseException) -> str | None:
    """The message of a StorageError that failed a task, found in what Ray Data raised, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # a RayTaskError carries the task's own exception
        if isinstance(cause, StorageError):
            return str(cause).splitlines()[0]  # Ray Data appends lines about its retry settings
        if type(e) is StorageError:
            return str(e).splitlines()[0]
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None


def _exists(u) -> bool:
    fs, p = fsspec_fs(u)
    with storage_errors(u):
        if u.scheme != "file" and "/" not in p.strip("/"):
            return True  # a bare bucket: listing tells (and surfaces NoSuchBucket)
        return fs.exists(p)
