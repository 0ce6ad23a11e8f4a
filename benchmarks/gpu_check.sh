#!/usr/bin/env bash
# GPU checks, bf16 with sdpa, on one CUDA device (not part of CI; about 8 minutes on an H100/H200):
#   1. block decoding's exactness (benchmarks/gpu_exactness.py): B = 1 = the AR parent's generate, cached = uncached;
#   2. the decode benchmark: full-sequence and block-diffusion rows of stories260K vs its AR parent (both models are
#      trained first if missing: runs/stories/final, runs/stories260k-block/final);
#   3. the training-step benchmark (throughput and memory ÷ a causal step), sdpa and flex attention side by side;
#   3b. flex attention, compiled, against sdpa in float32 (benchmarks/flex_check.py): every mask, loss and gradients;
#       and a flex training run stopped and resumed (bit-exact losses) on stories260K;
#   4. FSDP2 on one GPU in bf16 against a plain run, with a stop and resume (benchmarks/fsdp_compare.py);
#   5. speculative decoding (issue 25): the stories260K and SmolLM2-135M-Instruct drafters (their recipes run first
#      on this GPU if runs/*-drafter/final is missing; SmolLM2 needs the `gguf` package), greedy, bf16, batch 1 and
#      16, draft lengths 2 and 4: tokens per forward, time per token ÷ the parent's, output identical to the parent's;
#   6. keeping the parent (issue 26): the SmolLM2-135M block LoRA recipe in bf16, its ELBO and forgetting.
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
python3 benchmarks/train_step.py --device cuda --repeats 5 --flex | tee "$OUT/train_step.txt"
echo "[train step: ${SECONDS}s]"
SECONDS=0
python3 benchmarks/flex_check.py --device cuda | tee "$OUT/flex_check.txt" || echo "flex check FAILED (see above)"
F="recipes/adaptation/stories260k.yaml model.path=../shared/models/stories260K max_steps=8 save_steps=4 eval_steps=0
   sample_steps=0 model.attn_implementation=flex_attention anneal.anneal_steps=6"
python3 -m adapt train $F output_dir="$OUT/flex-straight" resume=false > "$OUT/flex.log" 2>&1
python3 -m adapt train $F output_dir="$OUT/flex-split" resume=false stop_after=4 >> "$OUT/flex.log" 2>&1
python3 -m adapt train $F output_dir="$OUT/flex-split" resume=true >> "$OUT/flex.log" 2>&1
python3 - "$OUT" <<'PY' | tee -a "$OUT/flex_check.txt"
import json, sys
losses = [[json.loads(l)["loss"] for l in open(f"{sys.argv[1]}/flex-{run}/metrics.jsonl") if '"loss"' in l]
          for run in ("straight", "split")]
print("flex training resume:", "bit-exact" if losses[0] == losses[1] and len(losses[0]) == 8 else "DIFFERS", losses)
PY
echo "[flex: ${SECONDS}s]"
# 4. FSDP2 on one GPU, bf16 mixed precision (recipes/accelerate/fsdp.yaml): vs a plain run, stop at 6 + resume to
#    12, the finals loaded with transformers alone (benchmarks/fsdp_compare.py)
SECONDS=0
C="recipes/adaptation/stories260k.yaml model.path=../shared/models/stories260K max_steps=12 save_steps=6 eval_steps=6
   sample_steps=0 resume=false train.mixed_precision=bf16"
LAUNCH="python3 -m accelerate.commands.launch --num_processes 1"
$LAUNCH --config_file recipes/accelerate/fsdp.yaml -m adapt train $C output_dir="$OUT/fsdp" > "$OUT/fsdp.log" 2>&1
$LAUNCH --mixed_precision bf16 -m adapt train $C output_dir="$OUT/plain" > "$OUT/plain.log" 2>&1
$LAUNCH --config_file recipes/accelerate/fsdp.yaml -m adapt train $C output_dir="$OUT/fsdp2" stop_after=6 > "$OUT/resume.log" 2>&1
$LAUNCH --config_file recipes/accelerate/fsdp.yaml -m adapt train ${C/resume=false/resume=true} output_dir="$OUT/fsdp2" >> "$OUT/resume.log" 2>&1
python3 benchmarks/fsdp_compare.py "$OUT" | tee "$OUT/fsdp.txt"
echo "[fsdp: ${SECONDS}s]"
# 5. speculative decoding: drafters trained first if missing (a few minutes each on a GPU)
SECONDS=0
for NAME in stories260k smollm2-135m; do
  DRAFTER=runs/$NAME-drafter
  [ -f "$DRAFTER/final/config.json" ] || python3 -m adapt train recipes/adaptation/$NAME-drafter.yaml \
    > "$OUT/$NAME-drafter.log" 2>&1
  CHAT=()  # SmolLM2's drafter learned the instruct parent's answers: time it on the same kind of chat prompts
  [ "$NAME" = smollm2-135m ] && CHAT=(--chat-message $'Continue this story:\n\n{text}')
  python3 benchmarks/decode.py --device cuda --dtype bfloat16 --speculative "$DRAFTER/final" --draft-lengths 2,4 \
    --prompts 16 --new 64 "${CHAT[@]}" --out "$OUT/speculative.md" | tail -n 6
done
echo "[speculative: ${SECONDS}s]"
# 6. keeping the parent (issue 26): the SmolLM2-135M block LoRA recipe trained on this GPU (bf16), then its block
#    ELBO and `forgetting` (block starts and AR mode beside the parent's, whole text and within documents) on the
#    validation text, scored as benchmarks/retention_ablation.py scores its SmolLM2 rows (16 x 256 tokens)
SECONDS=0
S=../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m adapt train recipes/adaptation/smollm2-135m-block-lora.yaml model.path=$S train.mixed_precision=bf16 \
  output_dir="$OUT/smollm2-block-lora" resume=false sample_steps=0 ${KEEP_STEPS:+max_steps=$KEEP_STEPS} \
  > "$OUT/smollm2-block-lora.log" 2>&1
python3 -m adapt eval "$OUT/smollm2-block-lora/final" --data ../shared/data/tinystories/valid.txt \
  --metrics elbo,forgetting --ar_parent $S --seq_length 256 --num_sequences ${KEEP_SEQUENCES:-16} --mc_samples 8 \
  --device ${KEEP_DEVICE:-cuda} > "$OUT/smollm2-block-lora-eval.json"
tail -c 800 "$OUT/smollm2-block-lora-eval.json"
echo "[keeping the parent: ${SECONDS}s]"
