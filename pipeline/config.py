"""The data section of a run's config: what to read, how to augment it, how Ray Data runs it.

Every field carries its help (``--help`` lists them, as it does the other sections').
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .crops import TransformConfig
from .decode import DEFAULT_MAX_PIXELS


def _f(default, help_: str, **kw):
    """A dataclass field with its help text (a list or dict default is copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help_}, **kw)
    return field(default=default, metadata={"help": help_}, **kw)


@dataclass
class DataConfig:
    source: str = _f("", "URI of prepared shards (mae prepare) or of an image folder")
    split: str = _f("train", "split of prepared shards to train on")
    img_size: int = _f(224, "image side in pixels; set from the model")
    patch_size: int = _f(16, "patch side in pixels; set from the model")
    augment: bool = _f(True, "RandomResizedCrop (data.crop_scale) + flip (data.hflip), for training; "
                             "else resize + center crop")
    crop_scale: list = _f([0.2, 1.0], "RandomResizedCrop area range [lo, hi] (MAE: 0.2-1.0)")
    hflip: float = _f(0.5, "probability of a horizontal flip (0 where left/right matters)")
    auto_augment: str = _f("", "train: timm augmentation policy after crop and flip, e.g. rand-m9-mstd0.5-inc1 "
                               "(RandAugment, fine-tuning's); '' for none (pretraining)")
    seed: int = _f(0, "seed of file order, local shuffle and augmentations")
    shuffle: bool = _f(True, "reshuffle the file order each epoch + a local shuffle buffer")
    shuffle_buffer: int = _f(1024, "rows in the trainer-side local shuffle buffer")
    val_fraction: float = _f(0.0, "image folders only: seeded hash split held out for validation pictures")
    decode_batch_size: int = _f(32, "images per decode call (shipped in blocks of data.output_block_rows)")
    rows_per_unit: int = _f(256, "images per read unit: one task reads and decodes one unit")
    decode_concurrency: int | None = _f(None, "max parallel decode tasks (null: Ray Data decides)")
    decode_cpus: float = _f(1.0, "CPUs reserved by each decode task")
    read_retries: int = _f(4, "retries, with backoff, of a failed storage read (throttled, reset) before "
                              "the run fails")
    max_data_cpus: float | None = _f(None, "cap on CPUs Ray Data may use, to leave room for training "
                                           "(null: all not used by training)")
    prefetch_batches: int = _f(4, "batches prefetched by each training worker's iterator")
    reduced_decode: bool = _f(True, "JPEG DCT-scaled decode when the crop allows it")
    max_pixels: int = _f(DEFAULT_MAX_PIXELS, "skip images with more pixels (decompression bombs)")
    deterministic: bool = _f(False, "preserve order, no shuffles, one image per block (slower: for comparisons): "
                                    "a resumed run, on any number of workers, trains on what the "
                                    "uninterrupted one did")
    decode: str = _f("cpu", "cpu: decode tasks ship patches | gpu: they ship JPEG bytes + crop boxes and the "
                            "training worker decodes on its device (pipeline.gpu_decode)")
    output_block_rows: int = _f(256, "rows per output block (fewer calls into the split coordinator)")
    segment_images: int = _f(10_000_000, "images per execution of the stream (whole epochs, at least one): a "
                                         "longer run is streamed in segments, the next started while the last "
                                         "batches of one train, so that Ray Data's per-block records stay bounded "
                                         "whatever the run's length (0: one execution)")
    progress_bars: bool = _f(False, "Ray Data's progress bars (on a terminal; off in job logs)")

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
        lo, hi = (float(x) for x in self.crop_scale)
        if not (0 < lo <= hi <= 1) or not (0 <= self.hflip <= 1):
            raise ValueError(f"data.crop_scale={list(self.crop_scale)} / data.hflip={self.hflip}: "
                             "crop_scale is [lo, hi] with 0 < lo <= hi <= 1, hflip a probability in [0, 1]")
        if self.decode not in ("cpu", "gpu"):
            raise ValueError(f"data.decode={self.decode!r}: cpu (decode tasks) or gpu (the training worker's device)")
        if self.output_block_rows < 1:
            raise ValueError(f"data.output_block_rows={self.output_block_rows}: must be >= 1")
        if self.segment_images < 0:
            raise ValueError(f"data.segment_images={self.segment_images}: images per segment (0: one execution)")
        if self.auto_augment and not self.auto_augment.startswith(("rand", "augmix", "v0", "original")):
            raise ValueError(f"data.auto_augment={self.auto_augment!r}: a timm policy string, e.g. "
                             "rand-m9-mstd0.5-inc1, or '' for none")
        if self.auto_augment and self.decode == "gpu":
            raise ValueError("data.auto_augment needs data.decode=cpu (the policy runs in the decode tasks)")
        # eval crop as the official fine-tuning code: 224/256 of the resized image up to 224 px, whole beyond
        crop_pct = 0.875 if self.img_size <= 224 else 1.0
        return TransformConfig(img_size=self.img_size, patch_size=self.patch_size, train=self.augment,
                               reduced_decode=self.reduced_decode, max_pixels=self.max_pixels,
                               scale=(lo, hi), hflip=float(self.hflip), crop_pct=crop_pct,
                               auto_augment=self.auto_augment if self.augment else "")
