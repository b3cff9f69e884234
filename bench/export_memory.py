"""Peak memory of `mae ckpt export` against torch's own DCP consolidation, on one checkpoint.

Writes a ViT-B MAE checkpoint (model + AdamW state, through the project's real writer), then
consolidates it twice, each in a fresh process whose peak RSS is measured:

  ours      python -m jobs.ckpt export DIR OUT --format full
  baseline  torch.distributed.checkpoint.format_utils.dcp_to_torch_save(DIR, OUT)  (whole checkpoint)

and a third process that only imports torch + the project, for the floor. Prints MiB and ratios.

    .venv/bin/python -m bench.export_memory [--preset mae_vit_base_patch16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss_mib(cmd: list[str]) -> tuple[float, float]:
    """-> (peak RSS of ``cmd`` in MiB, wall seconds)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", MEASURE, *cmd], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(r.stdout.strip().splitlines()[-1]) / 1024, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mae_vit_base_patch16")
    a = ap.parse_args()
    import torch
    import yaml

    from jobs.core import checkpoint as ckpt
    from mae_model import MaskedAutoencoder, get_preset
    tmp = tempfile.mkdtemp(prefix="mae-exportbench-")
    try:
        d = os.path.join(tmp, ckpt.ckpt_name(1))
        os.makedirs(d)
        model = MaskedAutoencoder(get_preset(a.preset))
        opt = torch.optim.AdamW(model.parameters())
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()  # creates the AdamW moments: the checkpoint is model + 2x model + steps
        model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        ckpt.write_local(model, opt, d, rank=0, train_state={"step": 1}, config_yaml=yaml.safe_dump(
            {"model": {"preset": a.preset, "overrides": {}}}))
        del model, opt
        ckpt_mib = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) / 2**20
        floor, _ = peak_rss_mib([sys.executable, "-c", "import torch, jobs.ckpt, mae_model"])
        ours, t_ours = peak_rss_mib([sys.executable, "-m", "jobs.ckpt", "export", d,
                                     os.path.join(tmp, "out.safetensors"), "--format", "full"])
        # our checkpoints are standard DCP: torch's consolidation reads the directory as it is
        base, t_base = peak_rss_mib([sys.executable, "-c",
                                     "import sys; from torch.distributed.checkpoint.format_utils import "
                                     "dcp_to_torch_save as f; f(sys.argv[1], sys.argv[2])",
                                     d, os.path.join(tmp, "out.pt")])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"preset {a.preset}: parameters {model_mib:.0f} MiB fp32; checkpoint on disk {ckpt_mib:.0f} MiB")
    print(f"floor (imports only)          peak RSS {floor:7.0f} MiB")
    print(f"ours: mae ckpt export full    peak RSS {ours:7.0f} MiB  ({ours - floor:.0f} above the floor, "
          f"{(ours - floor) / model_mib:.2f}x the model)  {t_ours:.1f}s")
    print(f"baseline: dcp_to_torch_save   peak RSS {base:7.0f} MiB  ({base - floor:.0f} above the floor, "
          f"{(base - floor) / model_mib:.2f}x the model)  {t_base:.1f}s")
    print(f"ratio baseline/ours (above the floor): {(base - floor) / max(ours - floor, 1):.2f}x")


if __name__ == "__main__":
    main()
