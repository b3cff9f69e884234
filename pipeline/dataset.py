"""One builder: a data config -> the Ray Dataset of uint8 patch batches the trainer consumes.

Every Ray Data setting lives here (DataContext, resource limits, decode concurrency, prefetch).
The trainer's only contact is ``get_dataset_shard("train").iter_torch_batches(**iter_kwargs(cfg))``.

Read and decode are fused into one task per block (no object-store hop between them), and the
output is uint8 patches ``[B, L, p*p*3]``: a quarter of the bytes of float32 between processes.
Corrupt, truncated, empty or non-image objects are skipped and counted by the run's counters actor
(:mod:`pipeline.stats`). The config is :class:`pipeline.config.DataConfig`; the data order and its
resume position are :mod:`pipeline.stream`'s.
"""

from __future__ import annotations

import functools
import zlib
from typing import Iterator

import numpy as np

from .config import DataConfig
from .crops import TransformConfig, crop_plan
from .decode import SkipImage
from .segments import concat_batches
from .sources import SourceInfo, label_of, relative_key, resolve
from .stats import stats_actor
from .storage import StorageError, parse_uri, pyarrow_fs, storage_errors, with_retries
from .stream import Stream, position_actor, resume_at


# ---------------------------------------------------------------------------- the map step
def _row_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    # Per-row seeding: the same (seed, epoch, key) always gets the same crop and flip, whatever
    # the block boundaries and task placement, so a resumed run sees the same augmentations.
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


def import_whole(name: str):
    """``importlib.import_module(name)``, done in a thread of its own so that it always completes.

    A decode task's first call imports torch (~2 s), in the worker's main thread. Ray Data cancels
    the running tasks when a run's worker group restarts, and a cancel is a KeyboardInterrupt in the
    main thread: one that lands inside ``import torch`` leaves torch half-initialized in that worker
    for good, and every later task there fails with "partially initialized module 'torch'". An
    interrupt reaches the main thread only: the importing thread finishes, and the next task (or
    the interrupted one's retry) finds the module whole."""
    import importlib
    import sys
    import threading
    if name not in sys.modules:
        t = threading.Thread(target=importlib.import_module, args=(name,), name=f"import {name}", daemon=True)
        t.start()
        t.join()
    return importlib.import_module(name)


def decode_batch(batch: dict, *, tcfg: TransformConfig, seed: int, epoch: int,
                 class_index: dict | None, root: str | None, mode: str = "cpu") -> tuple[dict, int, dict]:
    """{"image": bytes[n], "key"|"path": str[n], ["label"]} -> ({"patches": uint8 [m, L, D],
    "label": int64 [m]}, decoded count, {skip reason: [keys]}). Crops are seeded by (seed, epoch, key).
    ``mode="gpu"``: headers only -> {"image": bytes [m], "box": float32 [m, 4], "flip": bool [m],
    "orient": int8 [m] (EXIF orientation 1-8), "label"} for
    :func:`pipeline.gpu_decode.decode_on_device` (broken headers are skips here; a body that fails
    to decode is counted by the worker)."""
    images = batch["image"] if "image" in batch else batch["bytes"]
    keys = batch["key"] if "key" in batch else batch["path"]
    labels = batch.get("label")
    L = (tcfg.img_size // tcfg.patch_size) ** 2
    out = np.empty((len(images), L, tcfg.patch_size**2 * 3), np.uint8)
    out_labels = np.full(len(images), -1, np.int64)
    n = 0
    skipped: dict[str, list[str]] = {}
    root_uri = parse_uri(root) if root else None
    plan = mode == "gpu"
    if not plan:  # here, not at the top: the actors that unpickle this module never import torch
        transform_image = import_whole(f"{__package__}.transforms").transform_image
    if plan:  # the device decodes: ship the bytes, the crop box and flip (the same draws), and
        # the EXIF orientation, which nvJPEG does not apply
        out = np.empty(len(images), object)
        boxes, flips = np.zeros((len(images), 4), np.float32), np.zeros(len(images), bool)
        orients = np.ones(len(images), np.int8)
    for i, (data, key) in enumerate(zip(images, keys)):
        key = str(key)
        raw = bytes(data) if data is not None else b""
        try:
            if plan:
                (boxes[n], flips[n], orients[n]), out[n] = crop_plan(raw, tcfg, _row_rng(seed, epoch, key)), raw
            else:
                transform_image(raw, tcfg, _row_rng(seed, epoch, key), out=out[n])
        except SkipImage as e:
            skipped.setdefault(e.reason, []).append(key)
            continue
        if labels is not None:
            v = labels[i]
            out_labels[n] = -1 if v is None or (isinstance(v, float) and np.isnan(v)) else int(v)
        elif class_index is not None:
            lab = label_of(relative_key(root_uri, key), class_index)
            out_labels[n] = -1 if lab is None else lab
        n += 1
    if plan:
        return {"image": out[:n], "box": boxes[:n], "flip": flips[:n], "orient": orients[:n],
                "label": out_labels[:n]}, n, skipped
    return {"patches": out[:n], "label": out_labels[:n]}, n, skipped


# ---------------------------------------------------------------------------- the builder
def configure_context(cfg: DataConfig):
    """All DataContext settings in one place."""
    from ray.data import DataContext, ExecutionResources
    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = bool(cfg.deterministic)
    if cfg.max_data_cpus is not None:
        ctx.execution_options.resource_limits = ExecutionResources(cpu=cfg.max_data_cpus)
    # Off by default: a training job's log is read as text (the trainer logs throughput and data
    # wait), and every bar refresh is a log line the cluster's log monitor ships.
    ctx.enable_progress_bars = bool(cfg.progress_bars)
    # Small output blocks stream to the trainers sooner and split more evenly between them.
    ctx.target_max_block_size = 16 * 2**20
    # (Transient storage errors: DataContext.retried_io_errors covers Ray's own readers only; the
    # decode tasks retry their reads themselves, see load_and_decode.)
    return ctx


def read_units(info: SourceInfo, rows_per_unit: int) -> list[dict]:
    """Split the source into read units of about ``rows_per_unit`` images, each read and decoded
    by one fused task: a Parquet row group (or a run of small ones), or a chunk of image files.

    Footers are read here, on the driver, with threads: no listing actors to start per epoch.
    """
    units: list[dict] = []
    if info.kind == "images":
        for i in range(0, len(info.files), rows_per_unit):
            files = info.files[i:i + rows_per_unit]
            units.append({"kind": "images", "files": files, "rows": len(files)})
        return units
    import pyarrow.parquet as pq
    from concurrent.futures import ThreadPoolExecutor
    fs, _ = pyarrow_fs(info.uri)

    def footer(path):
        with storage_errors(f"{info.uri} ({path})"):
            with fs.open_input_file(path) as f:
                md = pq.ParquetFile(f).metadata
        return path, [md.row_group(i).num_rows for i in range(md.num_row_groups)]

    with ThreadPoolExecutor(16) as pool:
        footers = list(pool.map(footer, info.files))
    for path, groups in footers:
        cur, n = [], 0
        for i, rows in enumerate(groups):
            cur.append(i)
            n += rows
            if n >= rows_per_unit:
                units.append({"kind": "parquet", "file": path, "row_groups": cur, "rows": n})
                cur, n = [], 0
        if cur:
            units.append({"kind": "parquet", "file": path, "row_groups": cur, "rows": n})
    return units


def load_and_decode(batch: dict, *, uri: str, units: list[dict], stream: Stream, start: tuple[int, int],
                    decode_batch_size: int, stats, position, read_retries: int = 4,
                    output_block_rows: int = 256, **decode_kw) -> Iterator[dict]:
    """One stream item (a read unit in one epoch) -> decoded uint8 patch batches, streamed out.

    Items before the start position (the driver's, or a later one that a restarted worker group
    set on the run's ``position`` actor) are dropped unread, and the first rows of the item at that
    position before decoding. Decoded and skipped counts go to the ``stats`` actor once per unit."""
    item = int(batch["item"][0])
    start = resume_at(position, start)
    if item < start[0]:
        return
    first_row = start[1] if item == start[0] else 0
    epoch, u = stream.unit_of(item)
    unit = units[u]
    fs, _ = pyarrow_fs(uri)
    ok, skipped, pending, rows = 0, {}, [], 0
    for part in _unit_rows(fs, uri, unit, first_row, decode_batch_size, read_retries):
        out, n, sk = decode_batch(part, root=uri, epoch=epoch, **decode_kw)
        ok += n
        for reason, ks in sk.items():
            skipped.setdefault(reason, []).extend(ks)
        # decoded in small batches (cache-friendly), shipped in blocks of output_block_rows: the
        # split coordinator on the driver's node handles one call per block
        pending.append(out)
        rows += n
        if rows >= output_block_rows:
            yield concat_batches(pending)
            pending, rows = [], 0
    if rows:
        yield concat_batches(pending)
    if stats is not None:
        stats.record.remote(ok, skipped)  # fire and forget, once per unit


def _unit_rows(fs, uri: str, unit: dict, first_row: int, batch: int, retries: int) -> Iterator[dict]:
    """A read unit's rows from ``first_row`` on, as {"key", "image"[, "label"]} batches of up to
    ``batch`` rows, in order.

    Parquet units are read one row group at a time, the next one in a reader thread while this
    one decodes (pyarrow reads without the GIL), so the task's CPU is not idle while it waits on
    storage. A read error is retried with backoff, then fails the task (and the run): never a skip.
    """
    if unit["kind"] != "parquet":
        keys = unit["files"][first_row:]
        for i in range(0, len(keys), batch):
            images = []
            for path in keys[i:i + batch]:
                def read(path=path):
                    with storage_errors(f"{uri} ({path})"), fs.open_input_stream(path) as f:
                        return f.read()
                images.append(with_retries(read, retries=retries))
            yield {"key": keys[i:i + batch], "image": images}
        return
    import pyarrow.parquet as pq
    from concurrent.futures import ThreadPoolExecutor
    opened: dict = {}

    def read(rg: int):
        def once():
            with storage_errors(f"{uri} ({unit['file']})"):
                try:
                    if "pf" not in opened:  # one open (and one footer read) per unit
                        opened["f"] = fs.open_input_file(unit["file"])
                        opened["pf"] = pq.ParquetFile(opened["f"])
                    return opened["pf"].read_row_group(rg, columns=["key", "image", "label"])
                except Exception:
                    opened.clear()  # a retry opens the file again
                    raise
        return with_retries(once, retries=retries)

    skip = first_row
    groups = list(unit["row_groups"])
    try:
        with ThreadPoolExecutor(1) as reader:
            nxt = reader.submit(read, groups[0])
            for j in range(len(groups)):
                t = nxt.result()
                if j + 1 < len(groups):
                    nxt = reader.submit(read, groups[j + 1])  # overlaps the decode below
                if skip >= t.num_rows:
                    skip -= t.num_rows
                    continue
                t, skip = t.slice(skip), 0
                keys, images, labels = t["key"].to_pylist(), t["image"].to_pylist(), t["label"].to_pylist()
                for i in range(0, len(keys), batch):
                    yield {"key": keys[i:i + batch], "image": images[i:i + batch], "label": labels[i:i + batch]}
    finally:  # also when a read fails or the task stops early
        if "f" in opened:
            opened["f"].close()


def _items_of_epoch(batch: dict, *, num_units: int, first_epoch: int, first_item: int, position,
                    segment_slot: int | None = None, segment_epochs: int = 0) -> dict:
    """{"id": [i]} -> {"item": the stream items of epoch ``first_epoch + i`` from the start on}. The
    start is the driver's, or a restarted worker group's later one: what was consumed is never
    even scheduled (the expansion runs lazily, after rank 0 has set the position). A segment's
    dataset (``segment_slot``) streams epochs ``s * segment_epochs + i`` instead, ``s`` the
    segment its slot streams next, as rank 0 set it on the position actor before this execution."""
    if segment_slot is not None:
        import ray
        first_epoch = int(ray.get(position.segment.remote(segment_slot))) * segment_epochs
    e = first_epoch + int(batch["id"][0])
    lo = max(e * num_units, resume_at(position, (first_item, 0))[0])
    return {"item": np.arange(lo, (e + 1) * num_units, dtype=np.int64)}


def build_dataset(cfg: DataConfig, *, epochs: int = 1, start_image: int = 0, run_id: str = "",
                  source: SourceInfo | None = None):
    """-> (ray.data.Dataset of {"patches", "label"}, SourceInfo, Stream). Streaming; nothing
    materialized.

    One execution spans ``epochs`` epochs from the position ``start_image`` (images consumed so
    far): the next epoch's first units are read and decoded while the last ones of this epoch
    train, with no drain and restart in between. Each stream item is one read unit, read and
    decoded by one task. ``run_id`` names the run: its one actor (:mod:`pipeline.runactor`) keeps its
    counters (:func:`pipeline.stats.stats_actor`) and, for a non-empty ``run_id``, the resume
    position (:func:`pipeline.stream.position_actor`) set by a restarted worker group, which the
    decode tasks honour.
    """
    info, units, stream = _units(cfg, source)
    first_item = stream.locate(start_image)[0]
    first_epoch = first_item // stream.num_units
    last_epoch = max(first_epoch + 1, start_image // max(1, stream.rows_per_epoch) + epochs)
    return _dataset(cfg, info, units, stream, start_image, last_epoch - first_epoch, run_id, None), info, stream


def build_segments(cfg: DataConfig, *, epochs_per_segment: int, start_image: int, run_id: str,
                   source: SourceInfo | None = None):
    """A run's stream in segments of ``epochs_per_segment`` epochs (:mod:`pipeline.segments`):
    -> ((slot 0's dataset, slot 1's dataset), SourceInfo, Stream). Each execution of a slot's
    dataset streams the segment set for that slot on the run's position actor, from the resume
    position on."""
    if not run_id or epochs_per_segment < 1:
        raise ValueError("a segmented stream needs a run id and at least one epoch per segment")
    info, units, stream = _units(cfg, source)
    return tuple(_dataset(cfg, info, units, stream, start_image, epochs_per_segment, run_id, (slot, epochs_per_segment))
                 for slot in (0, 1)), info, stream


def _units(cfg: DataConfig, source: SourceInfo | None):
    configure_context(cfg)
    info = source or resolve(cfg.source, cfg.split, cfg.val_fraction, cfg.seed)
    units = read_units(info, cfg.rows_per_unit)
    if not units:
        raise StorageError(f"{cfg.source}: no data to read for split {cfg.split!r}")
    return info, units, Stream(tuple(int(u["rows"]) for u in units), cfg.seed,
                               bool(cfg.shuffle and not cfg.deterministic))


def _dataset(cfg: DataConfig, info: SourceInfo, units: list[dict], stream: Stream, start_image: int, n: int,
             run_id: str, segment: tuple[int, int] | None):
    """The dataset of ``n`` epochs of ``stream`` from image ``start_image`` on (``segment`` = (slot,
    epochs per segment): of the segment set for that slot on the position actor)."""
    import ray.data
    first_item, first_row = stream.locate(start_image)
    first_epoch = first_item // stream.num_units
    stats = stats_actor(run_id=run_id)
    position = position_actor(run_id) if run_id else None  # no run id: no restarted group to follow
    # Epochs -> their items (tiny rows) -> one item per block -> one decode task per item.
    # (from_items: blocks put by the driver; ray.data.range would add a read task holding a whole CPU)
    ds = ray.data.from_items([{"id": i} for i in range(n)], override_num_blocks=n)
    # One small task at a time expands epochs into items (a task per epoch at once would start a
    # worker process for each of the run's epochs).
    ds = ds.map_batches(_items_of_epoch, batch_size=1, num_cpus=0.01, compute=ray.data.TaskPoolStrategy(size=1),
                        fn_kwargs={"num_units": stream.num_units, "first_epoch": first_epoch,
                                   "first_item": first_item, "position": position,
                                   "segment_slot": segment[0] if segment else None,
                                   "segment_epochs": segment[1] if segment else 0})
    ds = ds.repartition(target_num_rows_per_block=1)
    class_index = {c: i for i, c in enumerate(info.classes)} if (info.classes and info.kind == "images") else None
    fn = functools.partial(load_and_decode, uri=info.uri, units=units, stream=stream, start=(first_item, first_row),
                           decode_batch_size=cfg.decode_batch_size, stats=stats, position=position,
                           read_retries=cfg.read_retries, output_block_rows=cfg.output_block_rows,
                           tcfg=cfg.transform(), seed=cfg.seed, class_index=class_index, mode=cfg.decode)
    ds = ds.map_batches(fn, batch_size=1, batch_format="numpy", **decode_task_args(cfg))
    if cfg.deterministic:
        # Ray Train's split hands each block to the worker with the fewest rows so far (in order
        # under preserve_order). With one image per block that is a round robin from the
        # execution's start, the same from image 0 as from a resume position (a multiple of the
        # global batch), so each rank of a resumed run gets the images it had: the images consumed
        # are a prefix of the stream. With a read unit per block (Ray Data joins a task's small
        # outputs), a rank runs ahead of the others by up to a unit, and a multi-worker resume
        # at "images consumed" would skip some images and repeat others. (Still off by the count:
        # images skipped as corrupt, and the fewer than ``world`` rows the split leaves out at a
        # segment's end, both count as consumed.) One call into the split coordinator per image:
        # for comparisons, not for speed.
        ds = ds.repartition(target_num_rows_per_block=1)
    return ds


def decode_task_args(cfg: DataConfig) -> dict:
    """The decode tasks' resources and pool: a map given the same ones after ``build_dataset``'s
    stream is fused into its decode tasks by Ray Data instead of running as tasks of its own."""
    import ray.data
    return {"num_cpus": cfg.decode_cpus, "compute": ray.data.TaskPoolStrategy(size=cfg.decode_concurrency)}


def with_column(batch: dict, name: str, value) -> dict:
    """A decoded batch with one more column, ``value`` on every row (e.g. the split it came from).
    Torch-free, so that a task running it alone imports no more than this module."""
    n = len(next(iter(batch.values()))) if batch else 0
    return {**batch, name: np.full(n, value)}


def iter_kwargs(cfg: DataConfig, batch_size: int, seed_salt: int = 0) -> dict:
    """Keyword arguments for ``iter_torch_batches`` on the trainer side (one call per attempt:
    the stream spans the run's epochs). ``seed_salt`` varies the buffer's shuffle per rank/attempt."""
    kw = {"batch_size": batch_size, "prefetch_batches": cfg.prefetch_batches, "drop_last": True}
    if cfg.shuffle and not cfg.deterministic and cfg.shuffle_buffer > 0:
        kw.update(local_shuffle_buffer_size=cfg.shuffle_buffer, local_shuffle_seed=cfg.seed + 7919 * seed_salt)
    return kw
