"""Fine-tuning's recipe against the official code and the libraries it uses (no Ray here): the
parameter groups, the schedule, the classifier's forward against timm's VisionTransformer, the
augmentation policy against timm's factory, position-embedding interpolation, the recipes per
size, and the best checkpoint kept by the highest accuracy."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch

from reference import (official_adjust_learning_rate, official_interpolate_pos_embed,
                       official_param_groups_lrd)

from mae_model import get_preset, mae_vit_micro_patch4
from mae_model.vit import NO_WEIGHT_DECAY, ViTClassifier, accuracy, interpolate_pos_embed, param_groups_lrd


def small_vit(**kw) -> ViTClassifier:
    torch.manual_seed(0)
    return ViTClassifier(mae_vit_micro_patch4(), 10, **kw)


@pytest.mark.parametrize("global_pool", [True, False])
def test_layer_decay_groups_equal_the_official_param_groups_lrd(global_pool):
    model = small_vit(global_pool=global_pool, drop_path=0.1)
    ours = param_groups_lrd(model, 0.05, 0.65, with_names=True)
    theirs = official_param_groups_lrd(model, 0.05, no_weight_decay_list=list(NO_WEIGHT_DECAY), layer_decay=0.65)
    assert len(ours) == len(theirs) == 2 * (len(model.blocks) + 2)  # (embeddings, blocks, head) x (decay, not)
    for a, b in zip(ours, theirs):
        assert a["lr_scale"] == b["lr_scale"] and a["weight_decay"] == b["weight_decay"]
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
    names = {n: g for g in ours for n in g["names"]}
    for n in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"):
        assert names[n]["weight_decay"] == 0.0, n  # never decayed
    assert names["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    depth = len(model.blocks)
    assert names["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.65 ** (depth + 1))
    assert names["head.weight"]["lr_scale"] == 1.0
    # without names: exactly what torch's AdamW takes
    assert all(set(g) == {"lr_scale", "weight_decay", "params"} for g in param_groups_lrd(model, 0.05, 0.65))


def test_the_schedule_equals_the_official_per_iteration_formula():
    """Our per-step schedule at step s is the official adjust_learning_rate at epoch s / steps_per_epoch,
    per group with its lr_scale (5 warmup epochs, cosine to min_lr, 100 epochs)."""
    from jobs.core.optim import lr_at
    spe, epochs, warm, peak, min_lr = 7, 100, 5, 5e-4 * 1024 / 256, 1e-6
    groups = [{"lr_scale": 0.65 ** 3}, {"lr_scale": 1.0}]
    theirs = [dict(g) for g in groups]
    for step in range(0, spe * epochs, 3):
        lr = lr_at(step, peak=peak, warmup=warm * spe, total=epochs * spe, min_lr=min_lr)
        ref = official_adjust_learning_rate(theirs, step / spe, peak, min_lr, warm, epochs)
        assert lr == pytest.approx(ref, rel=1e-12, abs=1e-15)
        for g, t in zip(groups, theirs):
            assert lr * g["lr_scale"] == pytest.approx(t["lr"], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("global_pool", [True, False])
def test_forward_equals_timm_vision_transformer_with_the_same_weights(global_pool, tmp_path):
    """`mae evaluate --finetuned` scores with this forward: it equals timm's VisionTransformer
    (global_pool='avg', fc_norm=True as models_vit.py; or the cls token), and an official
    fine-tuned checkpoint (timm's layout, conv patch embedding) loads into it."""
    from timm.models.vision_transformer import VisionTransformer

    from mae_model.official import linear_to_conv
    from pipeline.patchify import patchify
    c = mae_vit_micro_patch4()
    ours = small_vit(global_pool=global_pool).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # every tensor matters, the head included
    timm = VisionTransformer(img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
                             num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=True, num_classes=10,
                             global_pool="avg" if global_pool else "token", fc_norm=global_pool,
                             norm_layer=functools.partial(torch.nn.LayerNorm, eps=c.norm_eps)).eval()
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    sd["patch_embed.proj.weight"] = linear_to_conv(sd["patch_embed.proj.weight"], c.patch_size)
    missing, unexpected = timm.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "norm" not in k]
    img = torch.randn(3, 3, c.img_size, c.img_size)
    with torch.no_grad():
        want = timm(img)
        got = ours(patchify(img, c.patch_size))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the official fine-tuned layout ({"model": timm state dict}) -> the same classifier
    torch.save({"model": timm.state_dict()}, tmp_path / "mae_finetuned_vit_micro.pth")
    from jobs.evaluate import load_classifier
    loaded, _ = load_classifier(str(tmp_path / "mae_finetuned_vit_micro.pth"), preset="mae_vit_micro_patch4")
    assert loaded.global_pool == global_pool and loaded.num_classes == 10
    with torch.no_grad():
        torch.testing.assert_close(loaded(patchify(img, c.patch_size)), want, rtol=1e-5, atol=1e-5)


def test_pretrained_encoder_loads_as_main_finetune_does():
    """Our MAE's weights -> the classifier: everything but the head and fc_norm (global pool) or the
    head (cls token); an official layout with a position table of another grid is interpolated as
    the official interpolate_pos_embed does."""
    from mae_model import MaskedAutoencoder
    mae = MaskedAutoencoder(mae_vit_micro_patch4())
    sd = mae.state_dict()
    assert set(small_vit(global_pool=True).load_pretrained(sd)) == {"head.weight", "head.bias", "fc_norm.weight",
                                                                   "fc_norm.bias"}
    m = small_vit(global_pool=False)
    assert set(m.load_pretrained(sd)) == {"head.weight", "head.bias"}
    torch.testing.assert_close(m.blocks[1].mlp.fc2.weight, mae.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(m.norm.weight, mae.norm.weight)
    # another resolution: a 12x12 table onto the 8x8 grid, bicubic, as the official code
    table = torch.randn(1, 1 + 144, mae.config.embed_dim)
    ref = {"pos_embed": table.clone()}
    official_interpolate_pos_embed(64, (1, 65, mae.config.embed_dim), ref)
    torch.testing.assert_close(interpolate_pos_embed(table, 64), ref["pos_embed"])
    m.load_pretrained({**sd, "pos_embed": table})
    torch.testing.assert_close(m.pos_embed.data, ref["pos_embed"])
    with pytest.raises(ValueError, match="preset"):
        ViTClassifier(get_preset("mae_vit_micro_patch4", embed_dim=96, num_heads=4), 10).load_pretrained(sd)


def test_the_augmentation_policy_is_timms_create_transform():
    """The decode tasks' RandAugment is the one timm's create_transform builds for the official
    recipe (same ops, magnitudes, probabilities and hyper-parameters), after the same crop and flip;
    random erasing on the device has the recipe's settings."""
    from timm.data import create_transform

    from jobs.core.finetune_config import FinetuneConfig
    from pipeline.transforms import auto_augment_transform
    cfg = FinetuneConfig()
    primary, secondary, final = create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                                 interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1,
                                                 separate=True)
    ref = secondary.transforms[0]
    ours = auto_augment_transform(cfg.data.auto_augment, 224)
    assert type(ours) is type(ref) and ours.num_layers == ref.num_layers and ours.choice_weights == ref.choice_weights
    assert [(o.name, o.prob, o.magnitude, o.magnitude_std, o.magnitude_max, o.hparams, o.kwargs)
            for o in ours.ops] == [(o.name, o.prob, o.magnitude, o.magnitude_std, o.magnitude_max, o.hparams, o.kwargs)
                                   for o in ref.ops]
    crop = primary.transforms[0]
    assert tuple(cfg.data.crop_scale) == tuple(crop.scale) and cfg.data.hflip == primary.transforms[1].p
    t = cfg.data.transform()
    assert t.ratio == pytest.approx(crop.ratio)
    erase = final.transforms[-1]
    f = cfg.finetune
    assert (f.reprob, f.remode, f.recount) == (erase.probability, erase.mode, erase.max_count)


def test_recipes_per_model_size_follow_finetune_md():
    from jobs.core.finetune_config import FinetuneConfig, LinprobeConfig
    from jobs.core.config import set_field
    want = {"mae_vit_base_patch16": (5e-4, 100, 0.65, 0.1), "mae_vit_large_patch16": (1e-3, 50, 0.75, 0.2),
            "mae_vit_huge_patch14": (1e-3, 50, 0.75, 0.3)}
    for preset, (blr, epochs, decay, drop) in want.items():
        cfg = FinetuneConfig()
        set_field(cfg, "model.preset", preset)
        set_field(cfg, "data.source", "s3://b/x")
        cfg.validate()
        got = (cfg.optim.base_lr, cfg.train.epochs, cfg.finetune.layer_decay, cfg.finetune.drop_path)
        assert got == (blr, epochs, decay, drop), preset
        assert tuple(cfg.optim.betas) == (0.9, 0.999) and cfg.optim.weight_decay == 0.05
        assert (cfg.optim.warmup_epochs, cfg.optim.min_lr, cfg.finetune.smoothing) == (5, 1e-6, 0.1)
        assert (cfg.finetune.mixup, cfg.finetune.cutmix, cfg.finetune.global_pool) == (0.8, 1.0, True)
    lp = LinprobeConfig()
    set_field(lp, "data.source", "s3://b/x")
    lp.validate()
    assert (lp.optim.base_lr, lp.train.epochs, lp.optim.warmup_epochs, lp.optim.weight_decay) == (0.1, 90, 10, 0.0)
    assert lp.finetune.linprobe and not lp.finetune.global_pool and not lp.mixup_active
    assert lp.train.batch_size * 32 == 16384 and lp.data.auto_augment == ""
    # a config section pretraining lacks is refused there, in one line
    from jobs.core.config import load
    from mae_model.config import ConfigError
    with pytest.raises(ConfigError, match="sections"):
        load(None, ["data.source=x", "finetune.mixup=0"])


def test_linear_probe_head_and_accuracy_counts():
    m = small_vit(linprobe=True, global_pool=False)
    m.freeze_encoder()
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    assert m.head[1].weight.std().item() == pytest.approx(0.01, rel=0.3)
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    top1, top5 = accuracy(logits, torch.tensor([1, 2, 2]))
    assert (top1.item(), top5.item()) == (2, 3)  # 3 classes: top-5 is everything


def test_the_best_checkpoint_is_the_highest_accuracy_and_marked(tmp_path):
    from jobs.core.checkpoint import INDEX, Finalizer
    from pipeline.storage import Store
    run = Store(str(tmp_path))
    fin = Finalizer(run, keep_last=1, best_metric="val/top1", best_mode="max", log=lambda *_: None)
    for step, acc in [(10, 40.0), (20, 55.0), (30, 50.0)]:
        name = f"checkpoint_{step:08d}"
        run.write(f"{name}/x", b"1")
        fin.complete({"name": name, "step": step, "complete": True, "metrics": {"val/top1": acc}},
                     [{"x": {"size": 1, "sha256": ""}}], 1)
    index = json.loads(run.read(INDEX))
    assert [e["step"] for e in index] == [20, 30]  # the last, and the best (highest top-1)
    assert [e.get("best", False) for e in index] == [True, False]
    assert not math.isnan(np.float64(index[0]["metrics"]["val/top1"]))


def test_the_command_line_is_checked_before_anything_runs():
    """`mae submit -- finetune ...` checks the arguments and the config here (no Ray, no storage)."""
    from jobs.core.common import UserError
    from jobs.finetune import check, parse
    from mae_model.config import ConfigError
    assert check(["none", "s3://b/train", "model.preset=mae_vit_micro_patch4", "finetune.mixup=0.5"]) is None
    a = parse(["s3://b/runs/pre", "s3://b/train", "--val", "s3://b/val", "--linprobe", "train.epochs=3"])
    assert (a.val, a.linprobe, a.config, a.overrides) == ("s3://b/val", True, None, ["train.epochs=3"])
    with pytest.raises(UserError, match="PRETRAINED"):
        check(["none"])
    with pytest.raises(ConfigError, match="finetune.nope"):
        check(["none", "s3://b/train", "finetune.nope=1"])
    with pytest.raises(ConfigError, match="even"):
        check(["none", "s3://b/train", "train.batch_size=7"])  # mixup pairs the images of a batch
