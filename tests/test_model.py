"""Unit tests of mae_model (no Ray, no distributed): shapes, masking, loss, layout, interop."""

import numpy as np
import pytest
import torch

from mae_model import (PRESETS, ConfigError, MAEConfig, MaskedAutoencoder, OfficialLayoutError,
                       get_preset, load_official_state_dict, mae_vit_micro_patch4, num_params,
                       to_official_state_dict)
from mae_model.official import conv_to_linear
from mae_model.pos_embed import get_2d_sincos_pos_embed
from pipeline.patchify import patchify, unpatchify
from reference import official_patchify, official_unpatchify, patchify_hwc, unpatchify_hwc


def micro(**kw):
    torch.manual_seed(0)
    return MaskedAutoencoder(mae_vit_micro_patch4(**kw))


def batch(cfg, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, cfg.num_patches, cfg.patch_dim), generator=g, dtype=torch.uint8)


# Known totals of the official models (models_mae.py), pos tables excluded.
OFFICIAL_PARAMS = {"mae_vit_base_patch16": 111_655_680, "mae_vit_large_patch16": 329_239_296,
                   "mae_vit_huge_patch14": 656_613_964}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes_on_meta(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        m = MaskedAutoencoder(cfg)
    n = num_params(m)
    print(f"{name}: {n / 1e6:.2f}M params, {cfg.train_flops_per_image() / 1e9:.1f} GFLOP/img train")
    if name in OFFICIAL_PARAMS:
        assert n == OFFICIAL_PARAMS[name]
    x = torch.empty(2, cfg.num_patches, cfg.patch_dim, dtype=torch.uint8, device="meta")
    loss, pred, mask = m(x)
    assert loss.shape == ()
    assert pred.shape == (2, cfg.num_patches, cfg.patch_dim)
    assert mask.shape == (2, cfg.num_patches)
    feats = m.forward_features(x)
    assert feats["cls"].shape == feats["mean"].shape == (2, cfg.embed_dim)


def test_official_preset_sizes():
    assert (get_preset("mae_vit_base_patch16").embed_dim, get_preset("mae_vit_base_patch16").depth) == (768, 12)
    h = get_preset("mae_vit_huge_patch14")
    assert (h.embed_dim, h.depth, h.num_heads, h.patch_size) == (1280, 32, 16, 14)
    assert (h.decoder_embed_dim, h.decoder_depth, h.decoder_num_heads, h.mlp_ratio) == (512, 8, 16, 4.0)
    # FLOPs per training image as counted in FACTS.md (ViT-B 58.7, ViT-L 124.5 GFLOP).
    assert round(get_preset("mae_vit_base_patch16").train_flops_per_image() / 1e9, 1) == 58.7
    assert round(get_preset("mae_vit_large_patch16").train_flops_per_image() / 1e9, 1) == 124.5


@pytest.mark.parametrize("bad, fragment", [
    (dict(img_size=30, patch_size=4), "not divisible"),
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(mask_ratio=0.0), "mask_ratio"),
    (dict(depth=0), "depth"),
    (dict(decoder_depth=0), "decoder_depth"),
    (dict(num_heads=5), "does not divide embed_dim"),
    (dict(decoder_num_heads=3), "does not divide decoder_embed_dim"),
    (dict(in_chans=1), "RGB"),
])
def test_config_errors_are_one_clear_line(bad, fragment):
    with pytest.raises(ConfigError) as e:
        mae_vit_micro_patch4(**bad)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_unknown_field_and_roundtrip():
    cfg = mae_vit_micro_patch4(decoder_depth=3)
    assert MAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown model field"):
        MAEConfig.from_dict({**cfg.to_dict(), "decoder_dpeth": 2})


def test_masking_kept_count_and_restore():
    m = micro(mask_ratio=0.75)
    cfg = m.config
    x = torch.randn(5, cfg.num_patches, 8)
    noise = torch.rand(5, cfg.num_patches)
    xm, mask, ids_restore = m.random_masking(x, 0.75, noise)
    keep = int(cfg.num_patches * 0.25)
    assert xm.shape == (5, keep, 8)
    assert (mask.sum(1) == cfg.num_patches - keep).all()
    # mask agrees with ids_restore: position ids_restore[i] < keep  <=> visible
    assert torch.equal(mask, (ids_restore >= keep).float())
    # kept patches are the ones with the smallest noise, in order of increasing noise
    ids_keep = torch.argsort(noise, dim=1)[:, :keep]
    assert torch.equal(xm, torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, 8)))
    # odd ratios: int(L * (1 - r)) exactly, as the official code
    for r in (0.5, 0.6, 0.9, 0.33):
        _, mask, _ = m.random_masking(x, r)
        assert int(mask[0].sum()) == cfg.num_patches - int(cfg.num_patches * (1 - r))


def test_same_noise_same_mask_and_loss():
    m = micro()
    x = batch(m.config)
    noise = torch.rand(3, m.config.num_patches)
    l1, p1, m1 = m(x, noise=noise)
    l2, p2, m2 = m(x, noise=noise)
    assert torch.equal(m1, m2) and torch.equal(p1, p2) and l1.item() == l2.item()
    _, _, m3 = m(x)
    assert not torch.equal(m1, m3)


def test_loss_ignores_visible_predictions():
    m = micro()
    x = batch(m.config)
    loss, pred, mask = m(x, noise=torch.rand(3, m.config.num_patches))
    target = m.normalize(x)
    changed = pred + 100.0 * (1 - mask)[..., None] * torch.randn_like(pred)
    assert torch.allclose(m.forward_loss(target, pred, mask), m.forward_loss(target, changed, mask))
    changed_masked = pred + mask[..., None] * 1.0
    assert not torch.allclose(m.forward_loss(target, pred, mask), m.forward_loss(target, changed_masked, mask))


def test_norm_pix_loss_target_against_direct_computation():
    m = micro(norm_pix_loss=True)
    x = batch(m.config)
    t = m.normalize(x).double()
    direct = torch.empty_like(t)
    for b in range(t.shape[0]):
        for i in range(t.shape[1]):
            v = t[b, i]
            mu = v.sum() / v.numel()
            var = ((v - mu) ** 2).sum() / (v.numel() - 1)  # unbiased, as torch.var's default
            direct[b, i] = (v - mu) / (var + 1e-6).sqrt()
    assert torch.allclose(m.loss_target(m.normalize(x)).double(), direct, atol=1e-5)
    raw = micro(norm_pix_loss=False)
    assert torch.equal(raw.loss_target(m.normalize(x)), m.normalize(x))


def test_input_normalization_is_imagenet_per_channel():
    m = micro()
    x = batch(m.config)
    imgs = unpatchify(x, 4).float() / 255  # (N, C, H, W)
    assert torch.equal(unpatchify(x, 4), official_unpatchify(x, 4))
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    expected = official_patchify((imgs - mean) / std, 4)
    assert torch.allclose(m.normalize(x), expected, atol=1e-6)
    assert torch.allclose(m.normalize(x), m.normalize(x.float() / 255), atol=1e-6)


def test_patch_layout_on_hand_built_image():
    p, H = 2, 4
    img = np.zeros((H, H, 3), np.uint8)
    for y in range(H):
        for x in range(H):
            for c in range(3):
                img[y, x, c] = 100 * c + 10 * y + x  # value encodes (row, col, channel)
    chw = torch.from_numpy(img).permute(2, 0, 1)
    patches = patchify(chw, p)
    assert patches.shape == (4, p * p * 3) and patches.dtype == torch.uint8 and patches.is_contiguous()
    # patch 1 is the top-right one (row-major grid); inside it (p, q, c) with c fastest
    assert patches[1][:6].tolist() == [2, 102, 202, 3, 103, 203]
    assert patches[2][6:9].tolist() == [30, 130, 230]  # bottom-left patch, second row (p=1), q=0
    official = official_patchify(chw[None].long(), p)[0]
    assert torch.equal(patches.long(), official)
    assert np.array_equal(patches.numpy(), patchify_hwc(img, p))
    assert torch.equal(patchify(chw[None], p)[0], patches)  # batched: the same rows
    assert torch.equal(unpatchify(patches, p), chw) and torch.equal(unpatchify(patches[None], p)[0], chw)
    assert np.array_equal(unpatchify_hwc(patches[None].numpy(), p)[0], img)
    # into a preallocated row (what the decode tasks do): the same bytes, in place
    out = torch.zeros((2, 4, p * p * 3), dtype=torch.uint8)
    row = out[1]
    assert patchify(chw, p, out=row) is row
    assert torch.equal(out[1], patches) and not out[0].any()
    with pytest.raises(ValueError, match="not divisible"):
        patchify(chw[:, :3], p)


def test_patchify_non_square_and_float_round_trip():
    imgs = torch.rand(2, 3, 8, 12)
    x = patchify(imgs, 4)
    assert x.shape == (2, 6, 48) and x.dtype == imgs.dtype
    assert torch.equal(unpatchify(x, 4, grid=(2, 3)), imgs)
    hwc = imgs.permute(0, 2, 3, 1).numpy()
    assert np.array_equal(x.numpy(), patchify_hwc(hwc, 4))


def test_init_matches_official_recipe():
    m = micro()
    assert torch.equal(m.pos_embed[0, 0], torch.zeros(m.config.embed_dim))
    assert torch.allclose(m.pos_embed[0], get_2d_sincos_pos_embed(m.config.embed_dim, 8, True))
    assert all(b.abs().max() == 0 for n, b in m.named_parameters() if n.endswith(".bias") and "norm" not in n)
    w = m.blocks[0].mlp.fc1.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert abs(m.mask_token.std().item() - 0.02) < 0.01
    assert torch.equal(m.norm.weight, torch.ones_like(m.norm.weight))
    # pos embed: not a parameter (fixed, not learned)
    assert "pos_embed" not in dict(m.named_parameters())


def test_sincos_matches_official_numpy_formula():
    # The official get_2d_sincos_pos_embed, transcribed with numpy.
    D, gs = 16, 3
    gh = np.arange(gs, dtype=np.float32)
    grid = np.stack(np.meshgrid(gh, gh), 0).reshape(2, 1, gs, gs)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    ref = np.concatenate([one_d(D // 2, grid[0]), one_d(D // 2, grid[1])], axis=1)
    ours = get_2d_sincos_pos_embed(D, gs).numpy()
    assert np.allclose(ours, ref, atol=1e-6)


def test_meta_build_then_init():
    cfg = mae_vit_micro_patch4()
    with torch.device("meta"):
        m = MaskedAutoencoder(cfg)
    m.to_empty(device="cpu")
    m.init_weights()
    loss, _, _ = m(batch(cfg))
    assert torch.isfinite(loss)


def test_official_layout_roundtrip(tmp_path):
    m = micro()
    sd = to_official_state_dict(m)
    assert sd["patch_embed.proj.weight"].shape == (64, 3, 4, 4)
    assert sd["pos_embed"].shape == (1, 65, 64)
    torch.save({"model": sd}, tmp_path / "mae.pth")
    torch.manual_seed(123)
    m2 = MaskedAutoencoder(m.config)
    info = load_official_state_dict(m2, tmp_path / "mae.pth")
    assert info["missing"] == []
    x, noise = batch(m.config), torch.rand(3, m.config.num_patches)
    a, b = m(x, noise=noise), m2(x, noise=noise)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_official_conv_patch_embed_equals_linear():
    m = micro()
    conv = torch.nn.Conv2d(3, 64, 4, 4)
    torch.nn.init.normal_(conv.weight)
    imgs = torch.rand(2, 3, 32, 32)
    ref = conv(imgs).flatten(2).transpose(1, 2)  # (N, L, D): the official PatchEmbed
    lin = torch.nn.functional.linear(official_patchify(imgs, 4), conv_to_linear(conv.weight), conv.bias)
    assert torch.equal(patchify(imgs, 4), official_patchify(imgs, 4))
    assert torch.allclose(ref, lin, atol=1e-5)
    del m


def test_encoder_only_checkpoint_reports_missing_decoder(capsys):
    m = micro()
    sd = {k: v for k, v in to_official_state_dict(m).items()
          if not (k.startswith("decoder") or k == "mask_token")}
    m2 = micro()
    info = load_official_state_dict(m2, sd)
    assert "decoder_pred.weight" in info["missing"] and "mask_token" in info["missing"]
    assert "encoder-only" in capsys.readouterr().out
    assert torch.equal(m2.blocks[0].attn.qkv.weight, m.blocks[0].attn.qkv.weight)


def test_wrong_shape_names_key_and_shapes():
    m = micro()
    sd = to_official_state_dict(m)
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(10, 64)
    with pytest.raises(OfficialLayoutError, match=r"blocks\.0\.mlp\.fc1\.weight.*\(10, 64\).*\(256, 64\)"):
        load_official_state_dict(micro(), sd)


def test_weight_decay_groups_match_timm_as_the_official_code_calls_it():
    """main_pretrain.py groups parameters with timm's weight-decay helper and no skip list: no
    decay on 1-D parameters and biases only, so cls_token and mask_token are decayed."""
    from timm.optim import param_groups_weight_decay

    from jobs.core.optim import param_groups
    m = MaskedAutoencoder(mae_vit_micro_patch4())
    name = {id(p): n for n, p in m.named_parameters()}

    def by_decay(groups):
        return {g["weight_decay"]: {name[id(p)] for p in g["params"]} for g in groups}
    ours, theirs = by_decay(param_groups(m, 0.05)), by_decay(param_groups_weight_decay(m, 0.05))
    assert ours == theirs
    assert {"cls_token", "mask_token"} <= ours[0.05]
    assert set(ours[0.0]) == {n for n, p in m.named_parameters() if p.ndim == 1 or n.endswith(".bias")}


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_a_non_finite_step_is_never_applied_and_needs_no_host_sync(clip):
    """The optimizer step of a non-finite loss leaves weights, AdamW moments and step counts as
    they were (the fused AdamW reads a device flag); the next finite step applies as usual."""
    from jobs.core.optim import build_optimizer, guarded_step
    torch.manual_seed(0)
    model = MaskedAutoencoder(mae_vit_micro_patch4())
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.05, betas=(0.9, 0.95), device_type="cpu")
    x = torch.randint(0, 256, (4, 64, 48), dtype=torch.uint8)
    model(x)[0].backward()
    assert float(guarded_step(opt, model.parameters(), clip)) == 0.0
    opt.zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {id(p): s["exp_avg"].clone() for p, s in opt.state.items()}
    (model(x)[0] * float("nan")).backward()
    flag = guarded_step(opt, model.parameters(), clip)
    opt.zero_grad()
    assert isinstance(flag, torch.Tensor) and float(flag) == 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(moments[id(p)], s["exp_avg"]) for p, s in opt.state.items())
    assert {float(s["step"]) for s in opt.state.values()} == {1.0}
    model(x)[0].backward()
    assert float(guarded_step(opt, model.parameters(), clip)) == 0.0
    assert not torch.equal(before["cls_token"], model.state_dict()["cls_token"])
    assert {float(s["step"]) for s in opt.state.values()} == {2.0}


def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """train.compile: each block compiled in place (here with the aot_eager backend: the same
    graph capture and autograd as inductor, without a C++ toolchain) changes no number."""
    from mae_model.parallelize import compile_blocks
    x = torch.randint(0, 256, (4, 64, 48), dtype=torch.uint8)
    noise = torch.rand(4, 64, generator=torch.Generator().manual_seed(1))
    out = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = MaskedAutoencoder(mae_vit_micro_patch4())
        if compiled:
            compile_blocks(model, backend="aot_eager")
        loss, _, _ = model(x, noise=noise)
        loss.backward()
        out.append((loss.detach(), model.blocks[0].attn.qkv.weight.grad.clone()))
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-5) and torch.allclose(out[0][1], out[1][1], atol=1e-6)
