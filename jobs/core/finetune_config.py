"""The fine-tuning and linear-probing configs: pretraining's sections with the official recipes'
defaults (``main_finetune.py`` / ``main_linprobe.py`` and ``FINETUNE.md``), plus a ``finetune``
section (the classifier, mixup/cutmix, label smoothing, random erasing, the validation set).

Where the paper's recipe depends on the model size, the field defaults to -1 ("the recipe's") and
:meth:`FinetuneConfig.validate` fills it in from the encoder's width:

| encoder | base lr | epochs | layer decay | drop path |
|---|---|---|---|---|
| ViT-B and smaller | 5e-4 | 100 | 0.65 | 0.1 |
| ViT-L | 1e-3 | 50 | 0.75 | 0.2 |
| ViT-H | 1e-3 | 50 | 0.75 | 0.3 |

lr = base lr x global batch / 256 (the recipe's global batch is 1024), AdamW (0.9, 0.999), weight
decay 0.05, 5 warmup epochs then half-cycle cosine to 1e-6, per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.core.config import (ModelSection, OptimSection, PretrainConfig, RunSection, ScalingSection, TrackSection,
                              TrainSection)
from mae_model.config import ConfigError
from pipeline.config import DataConfig, _f

# (base lr, epochs, layer decay, drop path) by encoder width: FINETUNE.md's three recipes.
RECIPES = {"base": (5e-4, 100.0, 0.65, 0.1), "large": (1e-3, 50.0, 0.75, 0.2), "huge": (1e-3, 50.0, 0.75, 0.3)}


def size_of(embed_dim: int) -> str:
    return "huge" if embed_dim >= 1280 else "large" if embed_dim >= 1024 else "base"


@dataclass
class FinetuneSection:
    val: str = _f("", "validation dataset (URI of prepared shards): scored every epoch; '' for the val split "
                      "of data.source")
    val_split: str = _f("", "split of the validation dataset ('': val if it has one, else its only split)")
    num_classes: int = _f(0, "classes of the head (0: the training set's manifest)")
    global_pool: bool = _f(True, "classify the mean patch token through fc_norm (official default); false: the "
                                 "cls token after the encoder's norm")
    layer_decay: float = _f(-1.0, "layer-wise lr decay (-1: the recipe's, 0.65 ViT-B, 0.75 ViT-L/H)")
    drop_path: float = _f(-1.0, "stochastic depth rate (-1: the recipe's, 0.1 / 0.2 / 0.3 for B / L / H)")
    mixup: float = _f(0.8, "mixup alpha (0: off)")
    cutmix: float = _f(1.0, "cutmix alpha (0: off)")
    mixup_prob: float = _f(1.0, "probability of mixup or cutmix per batch")
    mixup_switch_prob: float = _f(0.5, "probability of cutmix instead of mixup when both are on")
    mixup_mode: str = _f("batch", "batch | pair | elem (timm Mixup)")
    smoothing: float = _f(0.1, "label smoothing")
    reprob: float = _f(0.25, "random erasing probability (on the device, after normalization)")
    remode: str = _f("pixel", "random erasing fill: pixel | rand | const")
    recount: int = _f(1, "random erasing: max regions per image")
    linprobe: bool = _f(False, "linear probe: frozen encoder, BatchNorm + Linear head, LARS (main_linprobe.py)")
    eval_every_epochs: float = _f(1.0, "epochs between evaluations on the validation set (each also saves a "
                                       "checkpoint); the last step always evaluates")


@dataclass
class FinetuneOptim(OptimSection):
    base_lr: float = _f(-1.0, "base learning rate; lr = base_lr * global_batch / 256 (-1: the recipe's, 5e-4 "
                              "ViT-B, 1e-3 ViT-L/H)")
    min_lr: float = _f(1e-6, "floor of the cosine schedule")
    weight_decay: float = _f(0.05, "AdamW weight decay (none on norms, biases, cls token and position embeddings)")
    betas: list = _f([0.9, 0.999], "AdamW betas")
    warmup_epochs: float = _f(5.0, "linear warmup length in epochs (per-step schedule)")


@dataclass
class FinetuneTrain(TrainSection):
    epochs: float = _f(-1.0, "passes over the training data (-1: the recipe's, 100 ViT-B, 50 ViT-L/H)")
    batch_size: int = _f(32, "images per worker per micro-batch (the recipe: global batch 1024)")
    best_metric: str = _f("val/top1", "metric that picks the kept best checkpoint ('' for none)")
    best_mode: str = _f("max", "min: the lowest best_metric is best | max: the highest (an accuracy)")
    log_every: int = _f(20, "optimizer steps between log lines")
    ckpt_every: int = _f(10**9, "optimizer steps between checkpoints besides the evaluations' (each "
                                "evaluation saves one)")
    vis_images: int = _f(0, "unused in fine-tuning")


@dataclass
class FinetuneData(DataConfig):
    split: str = _f("train", "split of the training dataset")
    crop_scale: list = _f([0.08, 1.0], "RandomResizedCrop area range [lo, hi] (fine-tuning: 0.08-1.0)")
    auto_augment: str = _f("rand-m9-mstd0.5-inc1", "timm augmentation policy after crop and flip (RandAugment)")


@dataclass
class FinetuneRun(RunSection):
    name: str = _f("mae-finetune", "run name: the same name and storage_path resume the run")


@dataclass
class FinetuneConfig(PretrainConfig):
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=FinetuneData)
    optim: OptimSection = field(default_factory=FinetuneOptim)
    train: TrainSection = field(default_factory=FinetuneTrain)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=FinetuneRun)
    track: TrackSection = field(default_factory=TrackSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)

    def validate(self) -> "FinetuneConfig":
        lr, epochs, decay, drop = RECIPES[size_of(self.model.build().embed_dim)]
        o, t, f = self.optim, self.train, self.finetune
        if o.base_lr < 0:
            o.base_lr = lr
        if t.epochs < 0:
            t.epochs = epochs
        if f.layer_decay < 0:
            f.layer_decay = decay
        if f.drop_path < 0:
            f.drop_path = drop
        if not 0 < f.layer_decay <= 1:
            raise ConfigError(f"finetune.layer_decay={f.layer_decay}: in (0, 1]")
        if not 0 <= f.drop_path < 1 or not 0 <= f.reprob <= 1 or not 0 <= f.smoothing < 1:
            raise ConfigError(f"finetune.drop_path={f.drop_path} / reprob={f.reprob} / smoothing={f.smoothing}: "
                              "probabilities in [0, 1)")
        if f.mixup_mode not in ("batch", "pair", "elem") or f.remode not in ("pixel", "rand", "const"):
            raise ConfigError(f"finetune.mixup_mode={f.mixup_mode!r} (batch, pair or elem) / finetune.remode="
                              f"{f.remode!r} (pixel, rand or const)")
        if self.mixup_active and t.batch_size % 2:
            raise ConfigError(f"train.batch_size={t.batch_size}: mixup/cutmix pair the images of a batch, so it "
                              "must be even (or finetune.mixup=0 finetune.cutmix=0)")
        if f.eval_every_epochs <= 0:
            raise ConfigError(f"finetune.eval_every_epochs={f.eval_every_epochs}: must be > 0")
        if self.data.decode != "cpu":
            raise ConfigError("data.decode=gpu is for pretraining: fine-tuning's augmentations run in the decode "
                              "tasks (data.decode=cpu)")
        t.knn_eval = False
        return super().validate()

    @property
    def mixup_active(self) -> bool:
        f = self.finetune
        return not f.linprobe and (f.mixup > 0 or f.cutmix > 0)


# ---------------------------------------------------------------------------- the linear probe
@dataclass
class LinprobeSection(FinetuneSection):
    global_pool: bool = _f(False, "the mean patch token through a (frozen) fc_norm; false: the cls token after the "
                                  "encoder's norm (main_linprobe.py's default)")
    layer_decay: float = _f(1.0, "unused by the linear probe")
    drop_path: float = _f(0.0, "unused by the linear probe")
    mixup: float = _f(0.0, "unused by the linear probe")
    cutmix: float = _f(0.0, "unused by the linear probe")
    smoothing: float = _f(0.0, "unused by the linear probe (cross-entropy)")
    reprob: float = _f(0.0, "unused by the linear probe")
    linprobe: bool = _f(True, "linear probe: frozen encoder, BatchNorm + Linear head, LARS (main_linprobe.py)")


@dataclass
class LinprobeOptim(OptimSection):
    base_lr: float = _f(0.1, "base learning rate; lr = base_lr * global_batch / 256 (LARS)")
    min_lr: float = _f(0.0, "floor of the cosine schedule")
    weight_decay: float = _f(0.0, "LARS weight decay")
    warmup_epochs: float = _f(10.0, "linear warmup length in epochs")


@dataclass
class LinprobeTrain(FinetuneTrain):
    epochs: float = _f(90.0, "passes over the training data (the paper: 90)")
    batch_size: int = _f(512, "images per worker (the paper: global batch 16384 = 512 x 32 GPUs)")


@dataclass
class LinprobeData(FinetuneData):
    auto_augment: str = _f("", "no augmentation policy: RandomResizedCrop + flip only (main_linprobe.py)")


@dataclass
class LinprobeRun(RunSection):
    name: str = _f("mae-linprobe", "run name: the same name and storage_path resume the run")


@dataclass
class LinprobeConfig(FinetuneConfig):
    data: DataConfig = field(default_factory=LinprobeData)
    optim: OptimSection = field(default_factory=LinprobeOptim)
    train: TrainSection = field(default_factory=LinprobeTrain)
    run: RunSection = field(default_factory=LinprobeRun)
    finetune: FinetuneSection = field(default_factory=LinprobeSection)

    def validate(self) -> "LinprobeConfig":
        self.finetune.linprobe = True
        return super().validate()
