"""Block decoding's exactness checks on a GPU, in bf16 with sdpa (the tests run them on CPU in float32).

1. stories260K converted with block size 1, greedy, one token per pass with the exact KV cache, vs the source's own
   `generate(do_sample=False)`: alone and in a left-padded batch.
2. The same source converted with block size 4: the cached path vs the uncached block-causal path, at temperature 0,
   with the schedule, a threshold and sub-blocks.

bf16 rounds differently in kernels of different shapes, so a near-tie between two tokens can flip; each check
prints the share of rows that agree token for token and exits non-zero below --min-agreement (default 0.9).

    python benchmarks/gpu_exactness.py [--device cuda] [--dtype bfloat16] [--source ../shared/models/stories260K]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def upto_eos(row, eos):
    row = row.tolist()
    return row[: row.index(eos) + 1] if eos in row else row


def agreement(a, b, width, eos):
    """Share of rows whose new tokens agree up to the first EOS (after it, generate pads and we repeat EOS)."""
    return sum(upto_eos(x[width:], eos) == upto_eos(y[width:], eos) for x, y in zip(a, b)) / len(a)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared/models/stories260K")
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--min-agreement", type=float, default=0.9)
    args = ap.parse_args()
    import adapt
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapt.model.block_masked_diffusion import block_diffusion_sample
    from adapt.model.modeling_masked_diffusion import ModelDenoiser

    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(args.source)
    texts = [t for t in (args.source.parents[1] / "data/tinystories/valid.txt").read_text().split("\n\n") if t.strip()]
    prompts = [tok(t).input_ids[: 4 + i % 9] for i, t in enumerate(texts[:16])]  # lengths 4..12: padding varies
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=args.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=args.device)
    source = AutoModelForCausalLM.from_pretrained(args.source, dtype=dtype, attn_implementation="sdpa")
    source = source.to(args.device).eval()
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in (1, 4):
            model, _ = adapt.load(adapt.convert(args.source, Path(tmp) / f"b{b}", block_size=b), device=args.device,
                                  dtype=args.dtype)
            model.set_attn_implementation("sdpa")
            eos, checks = model.generation_config.eos_token_id, {}
            if b == 1:
                ar = source.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new,
                                     pad_token_id=0)
                got = model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=args.new)
                checks["B=1 batch vs the source's generate"] = agreement(got, ar, width, eos)
                alone = [model.diffusion_generate(ids[i:i + 1, width - len(p):], max_new_tokens=args.new)
                         for i, p in enumerate(prompts)]
                checks["B=1 batch vs each prompt alone"] = sum(
                    upto_eos(a[0, len(p):], eos) == upto_eos(g[width:], eos)
                    for a, p, g in zip(alone, prompts, got)) / len(got)
            else:
                for name, kw in (("schedule", dict(steps=args.new)), ("threshold 0.9", dict(steps=args.new,
                                 threshold=0.9)), ("sub-blocks of 2", dict(steps=args.new, sub_block=2))):
                    got = model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=args.new, **kw)
                    with torch.no_grad():
                        ref = block_diffusion_sample(lambda padding: ModelDenoiser(model), ids, attention_mask=mask,
                                                     block_size=b, mask_token_id=model.config.mask_token_id,
                                                     shift=model.config.shift, max_new_tokens=args.new,
                                                     eos_token_id=model.generation_config.eos_token_id,
                                                     **kw).sequences
                    checks[f"B=4 cached vs uncached, {name}"] = agreement(got, ref, width, eos)
            for name, share in checks.items():
                print(f"{name}: {share:.0%} of {len(prompts)} rows agree token for token")
                if share < args.min_agreement:
                    failed.append(name)
    print(f"{args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}), "
          f"{args.dtype}, sdpa: " + ("all checks pass" if not failed else f"FAILED: {failed}"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
