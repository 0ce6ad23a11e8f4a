"""Where a block-diffusion model's ELBO comes from: cross-entropy per masked token with exactly l of every block's
B tokens masked (l = 1..B), and of the block-start tokens, which are predicted from the clean blocks before them
exactly as the AR parent predicts them. Same validation sequences as benchmarks/adapt_vs_scratch.py.

    python benchmarks/block_breakdown.py MODEL_DIR [--block-size B]
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
VALID = ROOT.parent / "shared" / "data" / "tinystories" / "valid.txt"


def masked_ce(model, rows, masked, block_size):
    from adapt.model.block_masked_diffusion import two_l_logits

    with torch.no_grad():
        logits = two_l_logits(model, rows.masked_fill(masked, model.config.mask_token_id), rows,
                            block_size=block_size)
    logits[..., model.config.mask_token_id] = -torch.inf  # never a clean token, as in the loss and the ELBO
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten(), reduction="none").view(
        rows.shape[0], -1)


def main():
    import adapt
    from adapt.config import DataConfig
    from adapt.training.data import load_documents, pack

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--block-size", type=int, help="default: the checkpoint's")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = adapt.load(args.model)
    B = args.block_size or model.config.block_size
    sequences = pack(load_documents(str(VALID), DataConfig()), tok, 128, "validation", max_rows=64)
    g = torch.Generator().manual_seed(0)
    for l in range(1, B + 1):
        total, count = 0.0, 0
        for rows in sequences.split(16):
            u = torch.rand(rows.shape, generator=g)
            u[:, 0] = 2.0  # context, never masked
            ranks = u.view(rows.shape[0], -1, B).argsort(-1).argsort(-1).view(rows.shape)
            masked = (ranks < l) & (u < 2)
            ce = masked_ce(model, rows, masked, B)
            total, count = total + ce[masked[:, 1:]].sum().item(), count + int(masked[:, 1:].sum())
        print(f"{l} of {B} masked per block: {total / count:.3f} nats per masked token")
    start = torch.arange(1, sequences.shape[1]) % B == 0
    ce = torch.cat([masked_ce(model, rows, torch.ones_like(rows, dtype=torch.bool), B) for rows in sequences.split(16)])
    print(f"block-start tokens (clean prefix only, as the AR parent): {ce[:, start].mean().item():.3f}")


if __name__ == "__main__":
    main()
