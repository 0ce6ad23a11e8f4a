"""flex attention, compiled (as transformers runs it), against sdpa on one device, float32: the logits of every mask
dlm-adapt builds (annealing ratios 0 / 0.3 / 1, the block-causal canvas, the 2L layout; left padding and packed
documents), and a training step's loss and gradients (CUDA only: torch has no flex backward on CPU). Lengths that
are and are not a multiple of flex's 128-token tile. Prints the largest differences and PASS/FAIL at atol 1e-4.
The CPU tests run flex uncompiled (tests/test_flex_attention.py); this is the compiled kernels' check.

    python benchmarks/flex_check.py [--device cuda] [--lengths 200 256] [--archs llama qwen2 gemma3_text]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

MASK, EOS, ATOL = 5, 2, 1e-4


def model(arch, impl, device, block_size=None):
    from tiny_models import tiny_config

    from adapt.model import MaskedDiffusionConfig, MaskedDiffusionLM

    config = tiny_config(arch, 100)
    config.max_position_embeddings = 1024
    torch.manual_seed(0)
    m = MaskedDiffusionLM(MaskedDiffusionConfig(text_config=config.to_dict(), mask_token_id=MASK,
                                                block_size=block_size))
    m.set_attn_implementation(impl)
    return m.to(device)


def batch(length, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(6, 100, (2, length), generator=g)
    x[0, length // 3] = x[0, 2 * length // 3] = EOS  # three packed documents in row 0
    pad = torch.ones_like(x)
    pad[1, : length // 5] = 0  # left padding in row 1
    noisy = x.masked_fill(torch.rand(x.shape, generator=g) < 0.5, MASK)
    return x.to(device), pad.to(device), noisy.to(device)


def outputs(arch, impl, length, device, grads):
    from adapt.model.block_masked_diffusion import two_l_logits
    from adapt.training.annealing import annealed_inputs
    from adapt.training.blocks import documents
    from adapt.training.objective import ObjectiveConfig, diffusion_loss

    x, pad, noisy = batch(length, device)
    real = pad.bool()
    positions = (pad.cumsum(-1) - 1).clamp_min(0)
    full, blocks = model(arch, impl, device).eval(), model(arch, impl, device, block_size=32).eval()
    out = {}
    with torch.no_grad():
        for ratio in (0.0, 0.3, 1.0):
            inputs = annealed_inputs(full, pad, ratio, torch.Generator().manual_seed(1))
            out[f"annealing {ratio}"] = full(x, **inputs, position_ids=positions).logits[real]
        out["block canvas"] = blocks(noisy, attention_mask=pad).logits[real]
        out["2L layout"] = two_l_logits(blocks, noisy, x, pad, document_ids=documents(x, EOS))[real]
    if grads:
        blocks.train()
        logits = two_l_logits(blocks, noisy, x, pad, document_ids=documents(x, EOS))
        masked = (noisy == MASK) & real
        t = torch.full(x.shape, 0.5, device=device)
        loss = diffusion_loss(logits, x, masked, real, t, ObjectiveConfig(), shift=True, mask_token_id=MASK)
        loss.backward()
        out["2L loss"] = loss.detach()[None]
        out["2L gradients"] = torch.cat([p.grad.flatten() for p in blocks.parameters() if p.grad is not None])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[200, 256])
    ap.add_argument("--archs", nargs="+", default=["llama", "qwen2", "gemma3_text"])
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    failed = 0
    for arch in args.archs:
        for length in args.lengths:
            grads = args.device != "cpu"
            dense = outputs(arch, "sdpa", length, args.device, grads)
            flex = outputs(arch, "flex_attention", length, args.device, grads)
            for name, value in dense.items():
                diff = (flex[name] - value).abs().max().item()
                ok = diff <= ATOL  # NaN fails
                failed += not ok
                print(f"{arch:12s} L={length:4d} {name:14s} max |flex - sdpa| {diff:.2e} {'PASS' if ok else 'FAIL'}",
                      flush=True)
    print("flex check:", "all PASS" if not failed else f"{failed} FAIL")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
