"""The fine-tuning (and linear-probing) worker: the official ``main_finetune.py`` /
``main_linprobe.py`` loops on the pretraining machinery (strategies, DCP checkpoints, exact resume,
metrics and trackers: :class:`jobs.core.trainer.Trainer`).

Per step, on the device: uint8 patches -> ImageNet normalization -> images -> random erasing
(timm) -> mixup / cutmix with label smoothing (timm) -> patches -> the classifier -> soft-target
cross-entropy; AdamW over layer-wise-decayed parameter groups, lr per group = schedule x
``lr_scale``. Every ``plan.eval_every`` steps and at the end: top-1 / top-5 / loss on the
validation set, each image scored once over all ranks, then a checkpoint carrying them; the best
top-1 is kept (``train.best_metric``) and marked in the run's index.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from jobs.core.finetune_config import FinetuneConfig
from jobs.core.optim import guarded_step, lr_at
from jobs.core.plan import RunPlan
from jobs.core.trainer import DataExhausted, Trainer
from mae_model.model import IMAGENET_MEAN, IMAGENET_STD
from mae_model.parallelize import set_gradient_sync
from pipeline.patchify import patchify, unpatchify
from pipeline.private_api import import_timm


class FineTuner(Trainer):
    def __init__(self, cfg: FinetuneConfig, plan: RunPlan):
        self.f = cfg.finetune
        super().__init__(cfg, plan)
        p = cfg.data.patch_size
        dev = self.device
        self.mean = torch.tensor(IMAGENET_MEAN, device=dev).repeat(p * p)
        self.std = torch.tensor(IMAGENET_STD, device=dev).repeat(p * p)
        self.mixup = self.erase = None
        if cfg.mixup_active:
            Mixup = import_timm("timm.data").Mixup
            self.mixup = Mixup(mixup_alpha=self.f.mixup, cutmix_alpha=self.f.cutmix, prob=self.f.mixup_prob,
                               switch_prob=self.f.mixup_switch_prob, mode=self.f.mixup_mode,
                               label_smoothing=self.f.smoothing, num_classes=plan.num_classes)
        if self.f.reprob > 0 and not self.f.linprobe:
            RandomErasing = import_timm("timm.data.random_erasing").RandomErasing
            self.erase = RandomErasing(self.f.reprob, mode=self.f.remode, max_count=self.f.recount, num_splits=0,
                                       device=str(dev))
        self.criterion = self._criterion()
        self.best_top1 = 0.0

    # ------------------------------------------------------------------ the task's parts
    def module_factory(self):
        from mae_model.vit import ViTClassifier
        mcfg, f, n = self.cfg.model.build(), self.cfg.finetune, self.plan.num_classes

        def make():
            m = ViTClassifier(mcfg, n, global_pool=f.global_pool, drop_path=0.0 if f.linprobe else f.drop_path,
                              linprobe=f.linprobe)
            if f.linprobe:  # frozen before DDP wraps it: DDP then reduces the head's gradients only
                m.freeze_encoder()
            return m
        return make

    def build_optimizer(self):
        """Fine-tuning: AdamW over ``param_groups_lrd`` (layer-wise lr decay, no decay on norms,
        biases, cls token and position embeddings). Linear probe: the encoder frozen, LARS on the head."""
        if self.f.linprobe:
            from jobs.core.probe import LARS
            head = [p for n, p in self.model.named_parameters() if p.requires_grad]
            return LARS(head, lr=self.plan.peak_lr, weight_decay=self.cfg.optim.weight_decay)
        from mae_model.vit import param_groups_lrd
        groups = param_groups_lrd(self.model, self.cfg.optim.weight_decay, self.f.layer_decay)
        return torch.optim.AdamW(groups, lr=self.plan.peak_lr, betas=tuple(self.cfg.optim.betas), fused=True)

    def _criterion(self):
        if self.mixup is not None:  # smoothing is in the mixed targets
            return import_timm("timm.loss").SoftTargetCrossEntropy()
        if self.f.smoothing > 0:
            return import_timm("timm.loss").LabelSmoothingCrossEntropy(smoothing=self.f.smoothing)
        return torch.nn.CrossEntropyLoss()

    def _init_from(self, uri: str) -> None:
        """The pretrained encoder, as ``main_finetune.py`` loads it (:meth:`ViTClassifier.load_pretrained`),
        read once by rank 0 into a CPU copy and broadcast to every rank's shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from jobs.core.weights import init_state_dict
        sd, missing = {}, []
        if self.rank == 0:
            cpu = self.module_factory()()
            missing = cpu.load_pretrained(init_state_dict(uri, self.cfg.model.build(), verbose=False))
            sd = cpu.state_dict()
        set_model_state_dict(self.model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        self.say(f"[mae] fine-tuning from {uri} (new: {', '.join(missing) or 'nothing'}; broadcast from rank 0)")

    # ------------------------------------------------------------------ steps
    def normalize(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 patches (B, L, p*p*3) -> ImageNet-normalized float32."""
        return (patches.float() / 255.0 - self.mean) / self.std

    def next_batch(self):
        t0 = time.perf_counter()
        batch = next(self.batches, None)
        self.window.wait += time.perf_counter() - t0
        if batch is None:
            raise DataExhausted(f"the data stream ended at step {self.step} of {self.total}: more images were "
                                "skipped as corrupt than the plan's spare epoch covers; see the skip counts")
        y = batch["label"].to(self.device, non_blocking=True)
        if (y < 0).any() or (y >= self.plan.num_classes).any():
            raise ValueError(f"a training batch holds labels outside [0, {self.plan.num_classes}): the dataset "
                             "has unlabeled images or more classes than finetune.num_classes")
        return batch["patches"].to(self.device, non_blocking=True), y

    def augment(self, x: torch.Tensor, y: torch.Tensor):
        """On the device, in the official order: random erasing on the normalized images, then
        mixup / cutmix (images and soft targets). -> (normalized patches, targets)."""
        x = self.normalize(x)
        if self.erase is None and self.mixup is None:
            return x, y
        p = self.cfg.data.patch_size
        img = unpatchify(x, p)
        if self.erase is not None:
            img = self.erase(img)
        if self.mixup is not None:
            img, y = self.mixup(img, y)
        return patchify(img, p), y

    def train_step(self) -> None:
        batches = [self.next_batch() for _ in range(self.accum)]
        step_loss = torch.zeros((), device=self.device)
        for micro, (x, y) in enumerate(batches):
            x, y = self.augment(x, y)
            set_gradient_sync(self.model, micro == self.accum - 1)
            with self.autocast:
                logits = self.model(x)
            loss = self.criterion(logits.float(), y)
            (loss / self.accum).backward()
            step_loss += loss.detach() / self.accum
        self.lr = lr_at(self.step, peak=self.peak, warmup=self.warmup, total=self.total, min_lr=self.cfg.optim.min_lr)
        for g in self.opt.param_groups:
            g["lr"] = self.lr * g.get("lr_scale", 1.0)
        bad = guarded_step(self.opt, [p for p in self.model.parameters() if p.requires_grad], self.cfg.optim.clip_grad)
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.window.add_step(step_loss, bad, self.step)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Top-1 / top-5 / cross-entropy on the validation set, every image once: each rank scores
        its (unequal) share; under FSDP a rank whose share ran out runs an empty batch while others
        still score, so that every rank makes the same collective calls."""
        import ray.train

        from mae_model.vit import accuracy
        model = self.model if self.strategy != "ddp" else self.core
        model.eval()
        it = iter(ray.train.get_dataset_shard("val").iter_torch_batches(
            batch_size=self.cfg.train.batch_size, drop_last=False, prefetch_batches=2))
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, top1, top5, images
        c = self.cfg.model.build()
        empty = torch.zeros(0, c.num_patches, c.patch_dim, device=self.device)
        lockstep = self.strategy != "ddp" and self.world > 1
        t0 = time.perf_counter()
        while True:
            batch = next(it, None)
            if lockstep:
                more = torch.tensor([0 if batch is None else 1], device=self.device)
                dist.all_reduce(more, op=dist.ReduceOp.MAX)
                if not more.item():
                    break
            elif batch is None:
                break
            if batch is None:
                x = empty  # keeps this rank in step with the others' collectives; scores nothing
            else:
                x = self.normalize(batch["patches"].to(self.device))
            with self.autocast:
                logits = model(x).float()
            if batch is not None:
                y = batch["label"].to(self.device)
                top1, top5 = accuracy(logits, y, (1, 5))
                loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
                sums += torch.stack([loss.double(), top1.double(), top5.double(),
                                     torch.tensor(float(len(y)), dtype=torch.float64, device=self.device)])
        dist.all_reduce(sums)
        self.model.train()
        loss, top1, top5, n = sums.tolist()
        if n == 0:
            raise RuntimeError("the validation set yielded no images (all skipped as corrupt?)")
        acc1 = 100.0 * top1 / n
        self.best_top1 = max(self.best_top1, acc1)
        m = {"val/top1": acc1, "val/top5": 100.0 * top5 / n, "val/loss": loss / n, "val/images": int(n),
             "val/best_top1": self.best_top1, "epoch": self.step / self.plan.steps_per_epoch}
        self.say(f"[mae] step {self.step} (epoch {m['epoch']:.2f}): val top-1 {acc1:.2f}% top-5 {m['val/top5']:.2f}% "
                 f"loss {m['val/loss']:.4f} on {int(n)} images ({time.perf_counter() - t0:.1f}s); "
                 f"best top-1 {self.best_top1:.2f}%")
        return m

    # ------------------------------------------------------------------ the loop
    def fit(self) -> None:
        """Resume (or load the pretrained encoder), then: step, maybe log, evaluate and save."""
        cadence = self.begin()
        if cadence is None:
            return
        self.best_top1 = float(self.saved_metrics.get("val/best_top1", 0.0))
        while self.step < self.total:
            self.train_step()
            self.inject_faults()
            at = cadence.at(self.step)
            every = self.plan.eval_every  # steps, fractional: an evaluation at the first step past each multiple
            evaluate = math.floor(self.step / every) > math.floor((self.step - 1) / every) or self.step >= self.total
            save = at.checkpoint or evaluate or self.preempted()
            if not (at.log or save):
                continue
            m = self.metrics()
            if not self.check_finite(m):
                return
            if evaluate:
                m.update(self.evaluate())
            self.log(m)
            if save:
                self.save(m)
            if at.stop:
                break


def summary(metrics: list[dict]) -> dict:
    """The run's evaluations -> final and best top-1 (the official scripts print the max)."""
    evals = [m for m in metrics if "val/top1" in m]
    if not evals:
        return {}
    best = max(evals, key=lambda m: m["val/top1"])
    return {"final_top1": evals[-1]["val/top1"], "final_top5": evals[-1]["val/top5"],
            "best_top1": best["val/top1"], "best_step": best.get("step"), "evaluations": len(evals),
            "steps": evals[-1].get("step"), "val_images": evals[-1].get("val/images")}

