#!/usr/bin/env bash
# One short GPU check, torch only (Ray is not needed): MAE ViT-B/16 and ViT-L/16 training steps
# in bf16 under FSDP2 on one GPU (images/s, MFU), the plain model and HF ViTMAE beside them,
# and bf16-vs-fp32 loss agreement. Writes JSON to $OUT (or ./bench_out) and prints a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench_out}"; mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
HF=""; python3 -c "import transformers" 2>/dev/null && HF="--hf"
python3 -m bench.gpu_step --models base,large $HF --out "$OUT_DIR/gpu_step.json" 2>&1 \
  | tee "$OUT_DIR/gpu_step.log"
# data.decode=gpu: nvJPEG decode + crop + resize + patchify throughput at batch 256 (needs torchvision)
python3 -m bench.gpu_decode_check --out "$OUT_DIR/gpu_decode.json" 2>&1 | tee "$OUT_DIR/gpu_decode.log" || true
