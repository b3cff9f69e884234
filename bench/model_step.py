"""Forward+backward images/s on this CPU: our MAE against HuggingFace's ViTMAEForPreTraining
built with the same configuration (same widths/depths, mask ratio, norm-pix loss, LayerNorm eps
1e-6, SDPA attention, fp32), in the same run. Prints both and the ratio.

    python -m bench.model_step [--presets mae_vit_tiny_patch16,mae_vit_base_patch16] [--batch 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from mae_model import MaskedAutoencoder, get_preset


def hf_model(cfg):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
    hc = ViTMAEConfig(image_size=cfg.img_size, patch_size=cfg.patch_size, hidden_size=cfg.embed_dim,
                      num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                      intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio),
                      decoder_hidden_size=cfg.decoder_embed_dim,
                      decoder_num_hidden_layers=cfg.decoder_depth,
                      decoder_num_attention_heads=cfg.decoder_num_heads,
                      decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio),
                      mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss,
                      layer_norm_eps=cfg.norm_eps)
    hc._attn_implementation = "sdpa"
    return ViTMAEForPreTraining(hc)


def timed(step, batch, warm, iters):
    for _ in range(warm):
        step()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return batch * iters / (time.perf_counter() - t0)


def bench(preset, batch, warm, iters, rounds):
    cfg = get_preset(preset)
    torch.manual_seed(0)
    ours = MaskedAutoencoder(cfg)
    hf = hf_model(cfg)
    patches = torch.randint(0, 256, (batch, cfg.num_patches, cfg.patch_dim), dtype=torch.uint8)
    pixels = torch.randn(batch, 3, cfg.img_size, cfg.img_size)

    def step_ours():
        loss, _, _ = ours(patches)
        loss.backward()
        ours.zero_grad(set_to_none=True)

    def step_hf():
        hf(pixel_values=pixels).loss.backward()
        hf.zero_grad(set_to_none=True)

    a, b = [], []
    for _ in range(rounds):  # interleaved, so drift in machine load hits both alike
        a.append(timed(step_ours, batch, warm, iters))
        b.append(timed(step_hf, batch, warm, iters))
    ours_ips, hf_ips = max(a), max(b)
    print(f"{preset:24s} batch {batch:3d}  ours {ours_ips:8.2f} img/s   HF ViTMAE {hf_ips:8.2f} img/s"
          f"   ratio {ours_ips / hf_ips:5.2f}x", flush=True)
    return ours_ips, hf_ips


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="mae_vit_tiny_patch16,mae_vit_base_patch16")
    ap.add_argument("--batch", default="mae_vit_tiny_patch16=32,mae_vit_base_patch16=8")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    batches = dict(kv.split("=") for kv in a.batch.split(","))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU; "
          "forward+backward, best of interleaved rounds")
    for p in a.presets.split(","):
        bench(p, int(batches.get(p, 8)), 1, a.iters, a.rounds)


if __name__ == "__main__":
    main()
