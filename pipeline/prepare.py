"""``mae prepare SRC DST``: shard a folder/prefix of images, or tar archives of them, once into
Parquet + a manifest.

SRC is a folder or prefix of images (``class/file.jpg`` gives labels), or tar archives read in
place (``archives.py``): a ``.tar`` object or a prefix of them, as ImageNet is distributed (a tar of
per-class tars; the flat val tar, whose labels come from ``--labels``) and as webdataset shards
(``KEY.jpg`` + ``KEY.cls``). Every image is a row (ref, key, size, class): ref is a path, or
[archive, offset, size] for an archive member.

The plan (which image goes to which shard) is made on the driver from the sorted listing and a
seeded permutation, so a rerun gives the same shards, each holding every class in its share; the
shards are validated and written in parallel by Ray Data tasks (one per shard, with a progress
bar), each reading its images (a file, or a byte range of an archive); the manifest is written
last, by the driver, and is what readers look for: a half-prepared DST has no manifest.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import re
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from .archives import check_not_compressed, is_archive, label_stem, list_images, parse_labels, read_member
from .cluster import check_visible_to_cluster
from .decode import DEFAULT_MAX_PIXELS, SkipImage, decode, open_image
from .sources import IMAGE_SUFFIXES, MANIFEST, imagefolder_classes, read_manifest, relative_key, split_of
from .storage import (StorageError, fsspec_fs, list_files, parse_uri, read_bytes, storage_errors, with_retries,
                      write_bytes)

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
    split: str = "train"  # the one split of everything (unless val_fraction splits train/val)
    labels: str | None = None  # a label file (LOC_val_solution.csv, 'FILENAME CLASS' lines)
    classes_from: str | None = None  # a prepared dataset whose manifest's classes index the labels


def split_name(key: str, cfg: PrepareConfig) -> str:
    return split_of(key, cfg.seed, cfg.val_fraction) if cfg.val_fraction > 0 else cfg.split


def folder_rows(files: list[tuple[str, int]], root_uri: str) -> list[tuple]:
    """A folder's listing [(path, size)] -> rows (path, key, size, class): the class is the
    folder of an ImageFolder layout (every image one folder below the root), else None."""
    root = parse_uri(root_uri)
    folder = imagefolder_classes(root, [p for p, _ in files]) is not None
    return [(p, k, s, k.split("/", 1)[0] if folder else None)
            for p, s in files for k in [relative_key(root, p)]]


def plan_shards(files: list[tuple[str, int]], root_uri: str, cfg: PrepareConfig) -> list[dict]:
    """The shards of a folder's sorted listing (see :func:`plan_rows`)."""
    return plan_rows(folder_rows(files, root_uri), cfg)


def plan_rows(rows: list[tuple], cfg: PrepareConfig) -> list[dict]:
    """Rows (ref, key, size, class) in listing order -> [{"split", "name", "items": [[ref, key],
    ...], "labels": [class, ...]}], deterministic: rows in a seeded permutation per split, cut into
    shards of about ``shard_size_mb``."""
    target = max(1, int(cfg.shard_size_mb * 1024 * 1024))
    by_split: dict[str, list[tuple]] = {}
    for row in rows:
        by_split.setdefault(split_name(row[1], cfg), []).append(row)
    shards = []
    for split in sorted(by_split):
        # Rows spread over the shards in a seeded random order (the same on every rerun): sorted
        # keys would give an ImageFolder one class per shard, and a read unit or a micro-batch a
        # handful of classes; the official code draws from a global permutation.
        rows = by_split[split]
        order = np.random.default_rng([cfg.seed, zlib.crc32(split.encode())]).permutation(len(rows))
        groups, cur, cur_bytes = [], [], 0
        for row in (rows[i] for i in order):
            if cur and cur_bytes + row[2] > target:
                groups.append(cur)
                cur, cur_bytes = [], 0
            cur.append(row)
            cur_bytes += row[2]
        if cur:
            groups.append(cur)
        for i, group in enumerate(groups):
            shards.append({"split": split, "name": f"{split}-{i:05d}-of-{len(groups):05d}.parquet",
                           "items": [[ref, key] for ref, key, _, _ in group], "labels": [r[3] for r in group]})
    return shards


def plan_probe(rows: list[tuple], cfg: PrepareConfig, classes: list | None) -> list[dict]:
    """The k-NN probe's images, once, so that a run reads bytes in proportion to the probe images
    it asks for (not the label column of every shard and the images of every shard holding one).

    Per split, up to ``probe_images`` images, classes interleaved in a seeded random order: any
    first n rows are a class-balanced random sample. Labeled sources only."""
    if not classes or cfg.probe_images <= 0:
        return []
    import random
    by: dict[str, dict[str, list]] = {}
    for ref, key, _, cls in rows:
        by.setdefault(split_name(key, cfg), {}).setdefault(cls, []).append([ref, key, cls])
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
        items = items[:cfg.probe_images]
        out.append({"split": split, "name": f"probe-{split}.parquet", "items": [i[:2] for i in items],
                    "labels": [i[2] for i in items], "probe": True})
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
    for (ref, key), cls in zip(shard["items"], shard["labels"]):
        # A read error (not found after the listing, denied, throttled, reset) is not a property of
        # the image: it is retried with backoff, then fails the job; only an image that is itself
        # broken is a skip.
        def read(ref=ref, key=key):
            if isinstance(ref, str):  # a file
                with storage_errors(ref):
                    return fs.cat_file(ref)
            with storage_errors(f"{ref[0]}:{key}"):  # an archive's member: [archive, offset, size]
                return read_member(fs, *ref)
        data = with_retries(read, retries=read_retries)
        try:
            validate(data, max_pixels)
        except SkipImage as e:
            skipped.append({"key": key, "reason": e.reason})
            continue
        keys.append(key)
        images.append(data)
        labels.append(class_index[cls] if class_index and cls is not None else None)
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
    rows: list
    classes: list | None
    shards: list[dict]


def check_values(cfg: PrepareConfig) -> None:
    """The settings that are wrong whatever the storage holds (checked by ``mae submit`` too)."""
    if not 0 <= cfg.val_fraction < 1:
        raise ValueError(f"--val-fraction {cfg.val_fraction}: must be in [0, 1)")
    if not cfg.shard_size_mb > 0:
        raise ValueError(f"--shard-size-mb {cfg.shard_size_mb}: must be > 0")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", cfg.split):
        raise ValueError(f"--split {cfg.split!r}: a name of lowercase letters, digits and _ (train, val)")
    if cfg.split != "train" and cfg.val_fraction > 0:
        raise ValueError(f"--split {cfg.split} with --val-fraction: --val-fraction splits one source into "
                         "train and val; --split names the one split of a set prepared on its own: give one")


def plan(cfg: PrepareConfig) -> Plan:
    """Everything that can fail on bad input, checked before any Ray work starts."""
    src, dst = parse_uri(cfg.src), parse_uri(cfg.dst)
    check_values(cfg)
    _check_destination(cfg, dst)
    table = parse_labels(read_bytes(cfg.labels).decode("utf-8", "replace"), cfg.labels) if cfg.labels else None
    given = classes_of(cfg.classes_from) if cfg.classes_from else None
    rows, classes = label_rows(source_rows(cfg, src), cfg, table, given)
    return Plan(cfg, rows, classes, plan_rows(rows, cfg) + plan_probe(rows, cfg, classes))


def _check_destination(cfg: PrepareConfig, dst) -> None:
    if cfg.overwrite and dst.scheme != "file" and "/" not in dst.path.strip("/"):
        raise StorageError(f"{cfg.dst}: --overwrite would delete the whole bucket: give a prefix "
                           f"(e.g. {dst.scheme}://{dst.bucket}/shards)")
    existing = list_files(dst) if _exists(dst) else []
    if existing:
        if not cfg.overwrite:
            raise StorageError(f"{cfg.dst}: not empty ({len(existing)} files): choose an empty "
                               "destination or pass --overwrite")


def source_rows(cfg: PrepareConfig, src) -> list[tuple]:
    """SRC's images as rows (ref, key, size, class), classes from the layout: a folder's
    (``folder_rows``), or the archives' (a ``.tar`` object, or the ``.tar`` objects of a prefix):
    a webdataset sample's ``.cls``, else the folder of an ImageFolder layout inside (a tar of tars
    is one: ``n01440764.tar`` holds ``n01440764/...``), else none. An archive's member is keyed by
    its path inside (after the archive's own path below SRC when SRC is a prefix)."""
    if is_archive(src.path):
        fs, path = fsspec_fs(src)
        with storage_errors(src):
            files = [(path, int(fs.info(path)["size"]))]
    else:
        check_not_compressed(cfg.src, src.path)
        files = [(p, s) for p, s in list_files(src) if not p.rsplit("/", 1)[-1].startswith(".")]
        if not files:
            raise StorageError(f"{cfg.src}: no files found (empty prefix?): check the source path")
        archives = [f for f in files if is_archive(f[0])]
        images = [p for p, _ in files if p.lower().endswith(IMAGE_SUFFIXES)]
        if not archives:
            if not images:  # (a prefix of webdataset .tar.gz shards, say: say so, not "0 images")
                for p, _ in files:
                    check_not_compressed(cfg.src, p)
            return folder_rows(files, str(src))
        if images:
            raise StorageError(f"{cfg.src}: holds both .tar archives and images ({images[0]}): give a prefix "
                               "of one kind, or the archive itself")
        files = archives
    fs, _ = fsspec_fs(src)
    members = list_images(fs, files, retries=cfg.read_retries)
    if not members:
        raise StorageError(f"{cfg.src}: no images in the archives (members need one of .jpg, .jpeg, .png, "
                           ".webp, ...): check the source")
    wds = any(m.label is not None for m in members)
    folder = all(m.name.count("/") == 1 for m in members)
    one = len(files) == 1 and files[0][0] == src.path
    return [([m.archive, m.offset, m.size], m.name if one else f"{relative_key(src, m.archive)}/{m.name}", m.size,
             m.label if wds else m.name.split("/", 1)[0] if folder else None) for m in members]


def classes_of(uri: str) -> list[str]:
    """The class list of a prepared dataset (``--classes-from``)."""
    m = read_manifest(uri)
    if m is None:
        raise StorageError(f"{uri}: no manifest.json: --classes-from takes a dataset prepared by mae prepare "
                           "(the train set's DST)")
    if not m.get("classes"):
        raise StorageError(f"{uri}: the prepared dataset has no classes (unlabeled): --classes-from takes a "
                           "labeled one (the train set's DST)")
    return list(m["classes"])


def label_rows(rows: list[tuple], cfg: PrepareConfig, table: dict | None,
               given: list[str] | None) -> tuple[list[tuple], list[str] | None]:
    """The rows' classes as class names, and the class list their labels index: ``given``
    (``--classes-from``), else the label file's classes sorted by name, else those of the rows
    (sorted; an integer class i, from a ``.cls`` or a label file, is the i-th: ``str(i)``).
    With a label file (``table``: file name stem -> class) it gives every row's class."""
    where = cfg.labels or cfg.src
    if table is not None:
        rows = [(ref, key, size, table.get(label_stem(key))) for ref, key, size, _ in rows]
        missing = [key for _, key, _, cls in rows if cls is None]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise StorageError(f"{cfg.src}: {missing[0]}{more} has no label in {cfg.labels}: give the label "
                               "file of these images (LOC_val_solution.csv for ILSVRC2012_img_val.tar)")
    labels = [r[3] for r in rows]
    if all(c is None for c in labels):
        if given is not None:
            raise StorageError(f"{cfg.src}: unlabeled (no class/file.jpg folders, KEY.cls or --labels): "
                               "--classes-from needs labeled images")
        return rows, None
    unlabeled = next((key for _, key, _, cls in rows if cls is None), None)
    if unlabeled is not None:  # (only webdataset samples can be: a folder or a label file labels all)
        raise StorageError(f"{cfg.src}: {unlabeled} has no KEY.cls while other samples have one: give every "
                           "sample its .cls, or none")
    if isinstance(labels[0], int):
        classes = given or [str(i) for i in range(max(labels) + 1)]
        bad = next((r for r in rows if r[3] >= len(classes)), None)
        if bad is not None:
            raise StorageError(f"{where}: {bad[1]} is labeled {bad[3]}, past the {len(classes)} classes of "
                               f"{cfg.classes_from}: give the labels and the prepared train set of the same dataset")
        return [(ref, key, size, classes[c]) for ref, key, size, c in rows], classes
    classes = given or sorted(set(table.values()) if table is not None else set(labels))
    known = set(classes)
    bad = next((r for r in rows if r[3] not in known), None)
    if bad is not None:
        raise StorageError(f"{where}: {bad[1]} is labeled {bad[3]!r}, which is not one of the {len(classes)} "
                           f"classes of {cfg.classes_from}: give the labels and the prepared train set of the "
                           "same dataset")
    return rows, classes


def prepare(cfg: PrepareConfig, progress: bool = True, the_plan: Plan | None = None) -> dict:
    """Run the whole prepare; returns the manifest (also written to DST/manifest.json)."""
    import ray.data

    check_visible_to_cluster({"SRC": cfg.src, "DST": cfg.dst}, shared_fs=cfg.shared_fs, setting="--shared-fs")
    pl = the_plan or plan(cfg)
    src, dst = parse_uri(cfg.src), parse_uri(cfg.dst)
    listed, classes, shards = pl.rows, pl.classes, pl.shards
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
    manifest = build_manifest(cfg, str(src), listed, classes, results)
    write_bytes(dst.join(MANIFEST), json.dumps(manifest, indent=1).encode())  # last: the marker
    return manifest


def build_manifest(cfg: PrepareConfig, src: str, rows: list, classes: list | None, results: list[dict]) -> dict:
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
        "counts": {"listed": len(rows), "ok": sum(s["count"] for s in splits.values()),
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
