"""FSDP on one GPU vs a plain run (benchmarks/gpu_check.sh step 4): per-step losses, a stop + resume, and the
finals, loaded with transformers alone. `python benchmarks/fsdp_compare.py DIR` reads DIR/{fsdp,plain,fsdp2}."""
import json
import sys

import torch
from transformers import AutoModelForMaskedLM

ROOT = sys.argv[1]


def losses(name):
    rows = [json.loads(line) for line in open(f"{ROOT}/{name}/metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


f, p, r = losses("fsdp"), losses("plain"), losses("fsdp2")
print("step  fsdp      plain     fsdp stop@6+resume")
for s in sorted(f):
    print(f"{s:4d}  {f[s]:.6f}  {p.get(s, float('nan')):.6f}  {r.get(s, float('nan')):.6f}")
print("max |fsdp - plain| / plain:", max(abs(f[s] - p[s]) / abs(p[s]) for s in f))
print("max |resumed - uninterrupted|:", max(abs(f[s] - r[s]) for s in f))
ids = torch.randint(0, 500, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
out = {}
for name in ("fsdp", "plain", "fsdp2"):
    m = AutoModelForMaskedLM.from_pretrained(f"{ROOT}/{name}/final", trust_remote_code=True).cuda().eval()
    cfg = m.config.text_config
    emb = m.get_input_embeddings().weight
    assert emb.shape[1] == cfg.hidden_size and emb.shape[0] >= cfg.vocab_size, (name, emb.shape)
    with torch.no_grad():
        out[name] = m(ids).logits.float()
    print(name, "final loads with transformers alone:", type(m).__name__, tuple(emb.shape), m.dtype)
keep = torch.ones(out["fsdp"].shape[-1], dtype=torch.bool)
keep[m.config.mask_token_id] = False
print("final logits max |fsdp - plain| (without [MASK]):", (out["fsdp"] - out["plain"])[..., keep].abs().max().item())
print("final logits max |fsdp resumed - fsdp| (without [MASK]):", (out["fsdp2"] - out["fsdp"])[..., keep].abs().max().item())
