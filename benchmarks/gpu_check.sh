#!/usr/bin/env bash
# GPU checks, bf16 with sdpa, on one CUDA device (not part of CI; about 5 minutes on an H100/H200):
#   1. block decoding's exactness (benchmarks/gpu_exactness.py): B = 1 = the AR parent's generate, cached = uncached;
#   2. the decode benchmark: full-sequence and block-diffusion rows of stories260K vs its AR parent (both models are
#      trained first if missing: runs/stories/final, runs/stories260k-block/final);
#   3. the training-step benchmark (throughput and memory ÷ a causal step).
# Needs dlm-adapt importable (pip install -e ".[dev]", or PYTHONPATH=.) and ../shared (models/stories260K,
# data/tinystories).
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default: runs/gpu-check; the tables go to OUT_DIR/*.md
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu-check}
mkdir -p "$OUT"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
SECONDS=0
python3 benchmarks/gpu_exactness.py --device cuda --dtype bfloat16 | tee "$OUT/exactness.txt"
echo "[exactness: ${SECONDS}s]"
SECONDS=0
python3 benchmarks/decode.py --device cuda --dtype bfloat16 --quick --block-model runs/stories260k-block/final \
  --ar-parent ../shared/models/stories260K \
  --prompts 16 --new 64 --out "$OUT/decode.md" | tail -n 25
echo "[decode: ${SECONDS}s]"
SECONDS=0
python3 benchmarks/train_step.py --device cuda --repeats 5 | tee "$OUT/train_step.txt"
echo "[train step: ${SECONDS}s]"
