"""One builder: a data config -> the Ray Dataset of uint8 patch batches the trainer consumes.

Every Ray Data setting lives here (DataContext, resource limits, decode concurrency, prefetch).
The trainer's only contact is ``get_dataset_shard("train").iter_torch_batches(**iter_kwargs(cfg))``.

Read and decode are fused into one task per block (no object-store hop between them), and the
output is uint8 patches ``[B, L, p*p*3]``: a quarter of the bytes of float32 between processes.
Corrupt, truncated, empty or non-image objects are skipped and counted by :class:`PipelineStats`.
"""

from __future__ import annotations

import functools
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, fields

import numpy as np

from .decode import DEFAULT_MAX_PIXELS, SkipImage
from .sources import SourceInfo, label_of, relative_key, resolve
from .storage import parse_uri, pyarrow_fs
from .transforms import TransformConfig, transform_image

STATS_ACTOR = "mae_pipeline_stats"

# Ray Data settings read from the environment of the processes that plan reads (not from
# DataContext): they must reach every worker, so entrypoints put them in the job's runtime_env.
# Parquet read units are bin-packed up to this many bytes; the default (128 MiB, ~1,300 encoded
# ImageNet JPEGs) makes decode tasks too coarse to spread over a node's cores.
READ_UNIT_BYTES = 16 * 2**20


def runtime_env_vars(read_unit_bytes: int = READ_UNIT_BYTES) -> dict[str, str]:
    return {"RAY_DATA_PARQUET_BIN_PACKING_BYTES": str(int(read_unit_bytes))}


@dataclass
class DataConfig:
    source: str = ""                 # URI: prepared shards (mae prepare) or an image folder
    split: str = "train"
    img_size: int = 224
    patch_size: int = 16
    augment: bool = True             # RandomResizedCrop + flip (train); else resize + center crop
    seed: int = 0
    shuffle: bool = True             # file order reshuffled each epoch + a local shuffle buffer
    shuffle_buffer: int = 1024       # rows in the trainer-side local shuffle buffer
    val_fraction: float = 0.0        # image folders only: seeded hash split
    decode_batch_size: int = 32      # rows per decode call
    decode_concurrency: int | None = None  # max parallel decode tasks (None: Ray Data decides)
    decode_cpus: float = 1.0         # CPUs reserved by each decode task
    max_data_cpus: float | None = None     # cap on CPUs for Ray Data (leave room for training)
    prefetch_batches: int = 4        # batches prefetched by the trainer-side iterator
    reduced_decode: bool = True      # JPEG DCT-scaled decode when the crop allows it
    max_pixels: int = DEFAULT_MAX_PIXELS
    deterministic: bool = False      # preserve order, no shuffles: for exact-resume comparisons

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown data field(s) {bad}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def transform(self) -> TransformConfig:
        return TransformConfig(img_size=self.img_size, patch_size=self.patch_size, train=self.augment,
                               reduced_decode=self.reduced_decode, max_pixels=self.max_pixels)


# ---------------------------------------------------------------------------- skip counters
def _stats_actor_cls():
    import ray

    @ray.remote(num_cpus=0)
    class PipelineStats:
        """Cluster-wide counters of decoded and skipped images (with reasons and examples)."""

        def __init__(self):
            self.ok = 0
            self.skipped = Counter()
            self.examples: dict[str, list[str]] = {}

        def record(self, ok: int, skipped: dict[str, list[str]]):
            self.ok += ok
            for reason, keys in skipped.items():
                self.skipped[reason] += len(keys)
                ex = self.examples.setdefault(reason, [])
                ex.extend(keys[: max(0, 5 - len(ex))])

        def get(self) -> dict:
            return {"ok": self.ok, "skipped": dict(self.skipped), "examples": self.examples}

        def reset(self):
            self.__init__()

    return PipelineStats


def stats_actor(create: bool = True):
    """The named counters actor of this Ray namespace (created on first use)."""
    import ray
    if create:
        # Owned by the driver that builds the dataset: it lives as long as the job.
        return _stats_actor_cls().options(name=STATS_ACTOR, get_if_exists=True).remote()
    try:
        return ray.get_actor(STATS_ACTOR)
    except ValueError:
        return None


def pipeline_stats() -> dict:
    import ray
    a = stats_actor(create=False)
    return ray.get(a.get.remote()) if a else {"ok": 0, "skipped": {}, "examples": {}}


# ---------------------------------------------------------------------------- the map step
def _row_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    # Per-row seeding: the same (seed, epoch, key) always gets the same crop and flip, whatever
    # the block boundaries and task placement, so a resumed run sees the same augmentations.
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


def _epoch() -> int:
    from ray.data import DataContext
    return int(getattr(DataContext.get_current(), "_execution_idx", 0) or 0)


def decode_batch(batch: dict, *, tcfg: TransformConfig, seed: int, epoch_offset: int,
                 class_index: dict | None, root: str | None, stats) -> dict:
    """{"image": bytes[n], "key"|"path": str[n], ["label"]} -> {"patches": uint8 [m, L, D], "label": int64 [m]}"""
    images = batch["image"] if "image" in batch else batch["bytes"]
    keys = batch["key"] if "key" in batch else batch["path"]
    labels = batch.get("label")
    epoch = epoch_offset + _epoch()
    L = (tcfg.img_size // tcfg.patch_size) ** 2
    out = np.empty((len(images), L, tcfg.patch_size**2 * 3), np.uint8)
    out_labels = np.full(len(images), -1, np.int64)
    n = 0
    skipped: dict[str, list[str]] = {}
    root_uri = parse_uri(root) if root else None
    for i, (data, key) in enumerate(zip(images, keys)):
        key = str(key)
        try:
            out[n] = transform_image(bytes(data) if data is not None else b"", tcfg, _row_rng(seed, epoch, key))
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
    if stats is not None:
        stats.record.remote(n, skipped)  # fire and forget
    return {"patches": out[:n], "label": out_labels[:n]}


# ---------------------------------------------------------------------------- the builder
def configure_context(cfg: DataConfig):
    """All DataContext settings in one place."""
    from ray.data import DataContext, ExecutionResources
    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = bool(cfg.deterministic)
    if cfg.max_data_cpus is not None:
        ctx.execution_options.resource_limits = ExecutionResources(cpu=cfg.max_data_cpus)
    ctx.enable_progress_bars = True
    # Small output blocks stream to the trainers sooner and split more evenly between them.
    ctx.target_max_block_size = 16 * 2**20
    # Retry transient object-store errors instead of failing the epoch.
    ctx.retried_io_errors = list({*ctx.retried_io_errors, "AWS Error SLOW_DOWN", "AWS Error NETWORK_CONNECTION",
                                  "AWS Error INTERNAL_FAILURE", "Connection reset", "Read timed out"})
    return ctx


def build_dataset(cfg: DataConfig, *, epoch_offset: int = 0, source: SourceInfo | None = None):
    """-> (ray.data.Dataset of {"patches", "label"}, SourceInfo). Streaming; nothing materialized.

    epoch_offset: the epoch the first pass over this dataset counts as (a resumed run passes the
    epoch it resumes in, so that augmentations and file order continue as uninterrupted).
    """
    import ray.data
    from ray.data import FileShuffleConfig

    configure_context(cfg)
    info = source or resolve(cfg.source, cfg.split, cfg.val_fraction, cfg.seed)
    fs, _ = pyarrow_fs(info.uri)
    shuffle = None
    if cfg.shuffle and not cfg.deterministic:
        shuffle = FileShuffleConfig(seed=cfg.seed + 1000003 * epoch_offset, reseed_after_execution=True)
    if info.kind == "parquet":
        ds = ray.data.read_parquet(info.files, filesystem=fs, columns=["key", "image", "label"],
                                   shuffle=shuffle)
        class_index = None
    else:
        ds = ray.data.read_binary_files(info.files, filesystem=fs, include_paths=True, shuffle=shuffle)
        class_index = {c: i for i, c in enumerate(info.classes)} if info.classes else None
    fn = functools.partial(decode_batch, tcfg=cfg.transform(), seed=cfg.seed, epoch_offset=epoch_offset,
                           class_index=class_index, root=info.uri, stats=stats_actor())
    ds = ds.map_batches(fn, batch_size=cfg.decode_batch_size, batch_format="numpy",
                        num_cpus=cfg.decode_cpus, concurrency=cfg.decode_concurrency)
    return ds, info


def iter_kwargs(cfg: DataConfig, batch_size: int, epoch: int = 0) -> dict:
    """Keyword arguments for ``iter_torch_batches`` on the trainer side."""
    kw = {"batch_size": batch_size, "prefetch_batches": cfg.prefetch_batches, "drop_last": True}
    if cfg.shuffle and not cfg.deterministic and cfg.shuffle_buffer > 0:
        kw.update(local_shuffle_buffer_size=cfg.shuffle_buffer, local_shuffle_seed=cfg.seed + 7919 * epoch)
    return kw
