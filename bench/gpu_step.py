"""MAE training-step throughput on one GPU, torch only (no Ray): images/s, MFU, bf16 vs fp32.

Runs the same code path as the trainer: the model built on the meta device, FSDP2
(`parallelize`, world size 1) with bf16 params / fp32 reduction, fused AdamW. Input is
synthetic uint8 patches already on the device, so this is the model's ceiling, not the
pipeline's. Variants: the trainer's strategies on one GPU (`fsdp2+fused`: scaling.strategy=fsdp;
`ddp`: scaling.strategy=ddp/auto, which on one GPU is the plain model under bf16 autocast), each
with the trainer's guarded step and eager or with `+compile` (train.compile: each block
compiled); `plain`: the model alone with a bare AdamW step; HuggingFace's ViTMAEForPreTraining
built with the same configuration (bf16 autocast) as a baseline. Each at two per-GPU batches.

    python -m bench.gpu_step --models base,large [--variants fsdp2+fused,plain] [--hf]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from jobs.core.optim import guarded_step
from mae_model import MaskedAutoencoder, get_preset
from mae_model.parallelize import compile_blocks, mixed_precision, parallelize

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks


def peak_flops() -> float:
    name = torch.cuda.get_device_name()
    for k, v in PEAK_BF16.items():
        if k in name:
            return v
    return float("nan")


def build(cfg, dtype, device, reshard=True, compiled=False):
    with torch.device("meta"):
        model = MaskedAutoencoder(cfg)
    if compiled:
        compile_blocks(model)
    parallelize(model, mp_policy=mixed_precision(dtype), reshard_after_forward=reshard)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    return model


def time_steps(step, batch, n_warm, n_iter):
    for _ in range(n_warm):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_iter):
        step()
    torch.cuda.synchronize()
    return batch * n_iter / (time.perf_counter() - t0)


def bench_ours(name, cfg, batch, n_warm, n_iter, variant):
    """variant: "fsdp2+fused" (the trainer's path on GPU), "fsdp2+foreach", "fsdp2-noreshard"
    (params kept gathered between forward and backward), or "plain" (no FSDP, bf16 autocast,
    fused AdamW: the model alone, as the HF baseline runs)."""
    dev = torch.device("cuda")
    compiled = "compile" in variant
    replicated = variant.startswith(("plain", "ddp"))  # one GPU: the ddp strategy is the plain model
    if replicated:
        torch.manual_seed(0)
        model = MaskedAutoencoder(cfg).to(dev)
        if compiled:
            compile_blocks(model)
    else:
        model = build(cfg, torch.bfloat16, dev, reshard="noreshard" not in variant, compiled=compiled)
    opt_kw = {"foreach": True} if "foreach" in variant else {"fused": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, **opt_kw)
    x = torch.randint(0, 256, (batch, cfg.num_patches, cfg.patch_dim), dtype=torch.uint8, device=dev)

    def fwd_bwd():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=replicated):
            loss, _, _ = model(x)
        loss.backward()

    def step():
        fwd_bwd()
        if variant.startswith("plain"):
            opt.step()
        else:  # the trainer's step: non-finite check on the device, clip 0 (the recipe's)
            guarded_step(opt, model.parameters(), 0.0)
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    ips = time_steps(step, batch, n_warm, n_iter)
    mem = torch.cuda.max_memory_allocated() / 2**30
    # Where the time goes: the optimizer step alone (grads left in place).
    fwd_bwd()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        opt.step()
    torch.cuda.synchronize()
    opt_ms = (time.perf_counter() - t0) / 5 * 1e3
    mfu = ips * cfg.train_flops_per_image() / peak_flops()
    del model, opt
    torch.cuda.empty_cache()
    return {"model": name, "impl": f"ours {variant}", "batch": batch, "img_per_s": round(ips, 1),
            "mfu": round(100 * mfu, 1), "step_ms": round(batch / ips * 1e3, 1),
            "opt_step_ms": round(opt_ms, 1), "peak_mem_gib": round(mem, 1)}


def bench_hf(name, cfg, batch, n_warm, n_iter):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
    hc = ViTMAEConfig(image_size=cfg.img_size, patch_size=cfg.patch_size, hidden_size=cfg.embed_dim,
                      num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                      intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio),
                      decoder_hidden_size=cfg.decoder_embed_dim,
                      decoder_num_hidden_layers=cfg.decoder_depth,
                      decoder_num_attention_heads=cfg.decoder_num_heads,
                      decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio),
                      mask_ratio=cfg.mask_ratio, norm_pix_loss=True, layer_norm_eps=1e-6,
                      attn_implementation="sdpa")
    dev = torch.device("cuda")
    model = ViTMAEForPreTraining(hc).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(pixel_values=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ips = time_steps(step, batch, n_warm, n_iter)
    del model, opt
    torch.cuda.empty_cache()
    return {"model": name, "impl": "hf-vitmae(autocast bf16)", "batch": batch,
            "img_per_s": round(ips, 1),
            "mfu": round(100 * ips * cfg.train_flops_per_image() / peak_flops(), 1)}


def bf16_agreement(cfg, batch=32, steps=5):
    """Same init, data and noise: losses of bf16 (FSDP2 mp policy) vs fp32 training."""
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(1)
    xs = [torch.randint(0, 256, (batch, cfg.num_patches, cfg.patch_dim), generator=g,
                        dtype=torch.uint8).to(dev) for _ in range(steps)]
    noise = [torch.rand(batch, cfg.num_patches, generator=g).to(dev) for _ in range(steps)]
    losses = {}
    for dt in ("fp32", "bf16"):
        model = build(cfg, torch.bfloat16 if dt == "bf16" else None, dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95))
        out = []
        for x, n in zip(xs, noise):
            loss, _, _ = model(x, noise=n)
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        losses[dt] = out
        del model, opt
    rel = max(abs(a - b) / abs(a) for a, b in zip(losses["fp32"], losses["bf16"]))
    return {"fp32": [round(v, 5) for v in losses["fp32"]],
            "bf16": [round(v, 5) for v in losses["bf16"]], "max_rel_diff": round(rel, 5)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="base,large")
    ap.add_argument("--batch", default="base=256/512,large=128/256,huge=64",
                    help="per-GPU batches per model, / separated")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--variants", default="plain,ddp,fsdp2+fused,ddp+compile,fsdp2+fused+compile")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument("--hf", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29531", rank=0, world_size=1)
    batches = dict(kv.split("=") for kv in a.batch.split(","))
    presets = {"base": "mae_vit_base_patch16", "large": "mae_vit_large_patch16",
               "huge": "mae_vit_huge_patch14"}
    rows = []
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    for m in a.models.split(","):
        cfg = get_preset(presets[m])
        print(f"{m}: {cfg.train_flops_per_image() / 1e9:.1f} GFLOP per training image", flush=True)
        runs = []
        for b in (int(x) for x in batches[m].split("/")):
            runs += [lambda v=v, b=b: bench_ours(m, cfg, b, a.warmup, a.iters, v) for v in a.variants.split(",")]
            if a.hf:
                runs.append(lambda b=b: bench_hf(m, cfg, b, a.warmup, a.iters))
        for run in runs:
            try:  # one failing variant must not cost the others' figures
                rows.append(run())
                print(rows[-1], flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{m}: variant failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                torch.cuda.empty_cache()
    agree = None if a.skip_agreement else bf16_agreement(get_preset("mae_vit_base_patch16"))
    print("bf16 vs fp32 (ViT-B, 5 AdamW steps):", agree, flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "peak_bf16_flops": peak_flops(), "rows": rows, "bf16_vs_fp32": agree}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
