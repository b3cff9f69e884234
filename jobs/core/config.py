"""The pretraining config: typed sections, a YAML file plus ``key=value`` overrides, validated.

Defaults follow the MAE paper (Table 8): base lr 1.5e-4 scaled by global batch / 256, AdamW
(0.9, 0.95), weight decay 0.05, mask ratio 0.75, norm-pix loss, warmup then half-cycle cosine.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from mae_model.config import PRESETS, ConfigError, MAEConfig, get_preset
from pipeline.config import DataConfig, _f  # _f: a field with its help, as every section has




@dataclass
class ModelSection:
    preset: str = _f("mae_vit_base_patch16", f"named preset: {', '.join(sorted(PRESETS))}")
    overrides: dict = _f({}, "MAEConfig fields over the preset, e.g. {decoder_depth: 4, mask_ratio: 0.9}")
    init_from: str = _f("", "start from weights: an official MAE .pth (full or encoder-only) or a "
                            "checkpoint directory of this project (URI)")
    activation_checkpointing: bool = _f(False, "recompute each block in backward (saves memory)")

    def build(self) -> MAEConfig:
        return get_preset(self.preset, **self.overrides)


@dataclass
class OptimSection:
    base_lr: float = _f(1.5e-4, "base learning rate; lr = base_lr * global_batch / 256 (paper)")
    lr: float = _f(0.0, "absolute learning rate; overrides base_lr when > 0")
    min_lr: float = _f(0.0, "floor of the cosine schedule")
    weight_decay: float = _f(0.05, "AdamW weight decay (none on biases and norms; the cls and mask tokens are decayed, as in the official code)")
    betas: list = _f([0.9, 0.95], "AdamW betas")
    warmup_epochs: float = _f(40.0, "linear warmup length in epochs (per-step schedule)")
    warmup_steps: int = _f(-1, "warmup length in optimizer steps; overrides warmup_epochs when >= 0")
    clip_grad: float = _f(0.0, "clip the global gradient norm to this (0: off)")
    accum_steps: int = _f(1, "gradient accumulation: micro-batches per optimizer step")


@dataclass
class TrainSection:
    epochs: float = _f(800.0, "passes over the training data (fractions allowed)")
    max_steps: int = _f(-1, "stop after this many optimizer steps (overrides epochs when > 0)")
    batch_size: int = _f(64, "images per worker per micro-batch")
    seed: int = _f(0, "seed of init, masking and data order")
    precision: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32")
    log_every: int = _f(20, "optimizer steps between log lines (console, metrics.jsonl, TensorBoard; rank 0, local)")
    report_every: int = _f(0, "optimizer steps between metric reports to Ray (what a Tune scheduler sees); "
                              "0: only at checkpoints. Each report is a barrier of every worker")
    min_report_interval_s: float = _f(10.0, "a report not carrying a checkpoint is skipped when the last one "
                                            "was sooner than this (Train V2's controller polls every ~2 s)")
    ckpt_every: int = _f(1000, "optimizer steps between checkpoints (and one at the end)")
    keep_last: int = _f(3, "complete checkpoints to keep (plus the best)")
    async_checkpoint: bool = _f(True, "upload checkpoints in the background: the loop waits only for the write to "
                                      "the node's disk; false: it also waits for the upload")
    best_metric: str = _f("loss", "metric that picks the kept best checkpoint ('' for none)")
    best_mode: str = _f("min", "min: the lowest best_metric is best (a loss) | max: the highest (an accuracy)")
    vis_every: int = _f(0, "steps between reconstruction pictures (0: at checkpoints and the end)")
    vis_images: int = _f(8, "validation images in the reconstruction picture")
    knn_eval: bool = _f(False, "k-NN top-1 on held-out labeled images at every report (the tuning objective)")
    knn_feature: str = _f("cls", "feature the reported knn_top1 is measured on: cls (token) or mean (of patches)")
    knn_train_images: int = _f(512, "k-NN memory bank: labeled images of the train split")
    knn_val_images: int = _f(256, "k-NN scored images: the val split")
    reshard_after_forward: bool = _f(True, "FSDP2: free gathered params after forward (less memory)")
    compile: bool = _f(False, "torch.compile each transformer block before sharding (GPU; the first steps "
                              "pay the compile)")


@dataclass
class ScalingSection:
    num_workers: int = _f(2, "Ray Train workers (one per GPU)")
    use_gpu: bool = _f(False, "one GPU per worker")
    cpus_per_worker: float = _f(1.0, "CPUs reserved by each training worker")
    resources_per_worker: dict = _f({}, "extra Ray resources per worker, e.g. {accelerator_type:H100: 0.01}")
    strategy: str = _f("auto", "parallelism: fsdp (shard over all workers) | hsdp (shard within a node, replicate "
                               "across nodes) | ddp (replicate; gradients all-reduced) | auto (ddp when weights, "
                               "gradients and AdamW state fit in a quarter of a device, else hsdp or fsdp)")
    placement_strategy: str = _f("PACK", "PACK (fewest nodes: NVLink/intra-node collectives) | SPREAD | "
                                         "STRICT_PACK | STRICT_SPREAD")


@dataclass
class RunSection:
    name: str = _f("mae-pretrain", "run name: the same name and storage_path resume the run")
    storage_path: str = _f("./runs", "where runs live: s3://bucket/prefix, gs://..., az://..., or a local path")
    shared_fs: bool = _f(False, "local paths (data.source, run.storage_path, model.init_from) are on a "
                                "filesystem every node mounts; else they are refused on a multi-node cluster")
    max_failures: int = _f(3, "restarts of the worker group from the latest checkpoint on failure (a lost worker, "
                              "a preempted node)")
    trial_retries: int = _f(3, "mae tune: restarts of a trial whose driver died (its node lost, e.g. a spot "
                               "reclaim); it resumes from its run's latest complete checkpoint")
    trial_driver_resources: dict = _f({}, "mae tune: Ray resources each trial's driver asks for (its Train "
                                          "controller and stream coordinator live on its node); default: a "
                                          "sliver of mae_stable, which the clusters' non-preemptible nodes advertise")
    address: str = _f("", "Ray cluster address (default: RAY_ADDRESS or a local Ray)")


@dataclass
class TrackSection:
    tensorboard: bool = _f(True, "TensorBoard event files in <run>/tb (scalars and the reconstruction picture), "
                                 "synced to storage every sync_every_s while the run goes")
    mlflow: bool = _f(False, "log to MLflow (pip install 'ray-mae[mlflow]'); the server: mlflow_uri or "
                             "MLFLOW_TRACKING_URI")
    wandb: bool = _f(False, "log to Weights & Biases (pip install 'ray-mae[wandb]'); WANDB_API_KEY, or "
                            "WANDB_MODE=offline")
    experiment: str = _f("ray-mae", "MLflow experiment / W&B project")
    mlflow_uri: str = _f("", "MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    group: str = _f("", "W&B group, MLflow tag mae.search: the search a trial belongs to (set by mae tune)")
    mlflow_parent: str = _f("", "MLflow parent run id: the search's run, its trials' runs nested under it "
                                "(set by mae tune)")
    sync_every_s: float = _f(30.0, "seconds between syncs of the TensorBoard files to the run's storage "
                                   "(off the training thread)")


@dataclass
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)
    track: TrackSection = field(default_factory=TrackSection)

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def sections(cls) -> dict[str, type]:
        """{section name: its dataclass}, in order."""
        return {f.name: type(f.default_factory()) for f in fields(cls)}

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        cfg = cls()
        sections = cls.sections()
        for section, values in (d or {}).items():
            if section not in sections:
                raise ConfigError(f"unknown config section {section!r}; sections: {', '.join(sections)}")
            if not isinstance(values, dict):
                raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
            for k, v in values.items():
                set_field(cfg, f"{section}.{k}", v)
        cfg.validate()
        return cfg

    def validate(self) -> "PretrainConfig":
        m = self.model.build()  # validates the model fields
        d = self.data
        if not d.source:
            raise ConfigError("data.source is empty: set data.source=URI of prepared shards or an image folder")
        t, o, s = self.train, self.optim, self.scaling
        for name, v, ok in [("train.batch_size", t.batch_size, t.batch_size >= 1),
                            ("optim.accum_steps", o.accum_steps, o.accum_steps >= 1),
                            ("scaling.num_workers", s.num_workers, s.num_workers >= 1),
                            ("train.log_every", t.log_every, t.log_every >= 1),
                            ("train.ckpt_every", t.ckpt_every, t.ckpt_every >= 1),
                            ("train.keep_last", t.keep_last, t.keep_last >= 1),
                            ("train.epochs", t.epochs, t.epochs > 0 or t.max_steps > 0),
                            ("optim.base_lr", o.base_lr, o.base_lr > 0 or o.lr > 0),
                            ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0)]:
            if not ok:
                raise ConfigError(f"{name}={v!r} is out of range")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ConfigError(f"optim.betas={o.betas!r}: two numbers in [0, 1), e.g. [0.9, 0.95]")
        if t.best_mode not in ("min", "max"):
            raise ConfigError(f"train.best_mode={t.best_mode!r}: min or max")
        if t.knn_feature not in ("cls", "mean"):
            raise ConfigError(f"train.knn_feature={t.knn_feature!r}: cls or mean")
        if t.report_every < 0 or t.min_report_interval_s < 0:
            raise ConfigError(f"train.report_every={t.report_every} / train.min_report_interval_s="
                              f"{t.min_report_interval_s}: must be >= 0")
        from mae_model.config import STRATEGIES
        if s.strategy not in STRATEGIES:
            raise ConfigError(f"scaling.strategy={s.strategy!r}: one of {', '.join(STRATEGIES)}")
        if t.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision={t.precision!r}: auto, bf16 or fp32")
        if t.precision == "bf16" and not s.use_gpu:
            raise ConfigError("train.precision=bf16 needs scaling.use_gpu=true (CPU training runs fp32)")
        if len(d.crop_scale) != 2:
            raise ConfigError(f"data.crop_scale={d.crop_scale!r}: two numbers [lo, hi], e.g. [0.2, 1.0]")
        d.transform()  # validates crop_scale and hflip
        # The pipeline must cut patches of the model's size.
        d.img_size, d.patch_size = m.img_size, m.patch_size
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = {"model": ModelSection, "data": DataConfig, "optim": OptimSection, "train": TrainSection,  # pretraining's
            "scaling": ScalingSection, "run": RunSection, "track": TrackSection}


def _coerce(name: str, current: Any, value: Any, ftype) -> Any:
    """Values from YAML or the command line -> the field's type, with a clear error."""
    if isinstance(value, str) and not isinstance(current, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{name}={value!r}: not a valid value") from None
    t = ftype if isinstance(ftype, type) else type(current) if current is not None else None
    if isinstance(ftype, str):  # postponed annotations
        t = {"int": int, "float": float, "bool": bool, "str": str, "dict": dict, "list": list}.get(
            ftype.split(" |")[0], None)
    if value is None:
        if "None" in str(ftype):
            return None
        raise ConfigError(f"{name}: a value is required")
    try:
        if t is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if t is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if t is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if t is str:
            return str(value)
        if t in (dict, list) and not isinstance(value, t):
            raise TypeError
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: expected {getattr(t, '__name__', t)}") from None
    return value


def set_field(cfg: PretrainConfig, dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    sections = type(cfg).sections()
    if section not in sections or not key:
        raise ConfigError(f"{dotted!r}: write section.field=value; sections: {', '.join(sections)}")
    obj = getattr(cfg, section)
    if section == "model" and key.startswith("overrides."):
        sub = key.split(".", 1)[1]
        known = {f.name for f in fields(MAEConfig)}
        if sub not in known:
            raise ConfigError(f"model.overrides.{sub}: unknown model field; known: {', '.join(sorted(known))}")
        obj.overrides[sub] = yaml.safe_load(value) if isinstance(value, str) else value
        return
    fmap = {f.name: f for f in fields(obj)}
    if key not in fmap:
        raise ConfigError(f"{dotted}: unknown field; {section} has: {', '.join(fmap)}")
    setattr(obj, key, _coerce(dotted, getattr(obj, key), value, fmap[key].type))


def load(path: str | None, overrides: list[str], cls: type | None = None) -> PretrainConfig:
    """A YAML file (optional) plus ``section.field=value`` overrides -> a validated config."""
    d: dict = {}
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path!r} does not exist: check the path")
        with open(path) as f:
            try:
                d = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections")
    cfg = (cls or PretrainConfig)()
    sections = type(cfg).sections()
    for section, values in d.items():
        if section not in sections:
            raise ConfigError(f"{path}: unknown section {section!r}; sections: {', '.join(sections)}")
        for k, v in (values or {}).items():
            set_field(cfg, f"{section}.{k}", v)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: write section.field=value, e.g. optim.base_lr=1e-3")
        k, v = ov.split("=", 1)
        set_field(cfg, k.strip(), v)
    return cfg.validate()


def describe(config_cls: type | None = None) -> str:
    """Every field with its default and help, for ``--help``."""
    lines = []
    for section, cls in (config_cls or PretrainConfig).sections().items():
        lines.append(f"\n{section}:")
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_ = f.metadata.get("help", "")
            lines.append(f"  {section}.{f.name} = {json.dumps(default)}\n      {help_}")
    return "\n".join(lines)
