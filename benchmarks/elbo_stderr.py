"""Is the ELBO's reported standard error honest? For a block-diffusion checkpoint at block sizes 2 and 4: the exact
block-wise bound by enumeration of every mask subset of every block, the K-draw estimate's real Monte-Carlo
spread over independent seeds, and the `stderr` each estimate reports: today's (collapsed strata) and the
within-row variance of the K draws taken as independent (before issue 26).

    python benchmarks/elbo_stderr.py MODEL [--rows 32] [--draws 64] [--seeds 16] [--write]
"""

import argparse
import itertools
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
VALID = HERE.parent.parent / "shared" / "data" / "tinystories" / "valid.txt"
TITLE = "# Standard error of the ELBO against exact enumeration (benchmarks/elbo_stderr.py)"


@torch.no_grad()
def exact_bound(model, ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """(rows,) each row's block-wise bound in nats per scored token (tokens 1..L−1), the estimator's expectation:
    per block of N scored tokens, the mean over l uniform on 1..N and a uniform l-subset S of (N/l)·Σ_{j∈S} CE_j(S),
    i.e. Σ over nonempty S of Σ_{j∈S} CE_j(S) / (|S|·C(N, |S|)). One 2L forward per subset pattern, the same
    pattern in every block (blocks do not see each other's noise); block 0's token 0 is context, never masked."""
    from adapt.model.block_masked_diffusion import two_l_logits

    mask_id = model.config.mask_token_id
    rows, length = ids.shape
    position = torch.arange(length) % block_size
    scorable = torch.ones(length, dtype=torch.bool)
    scorable[0] = False
    n_block = torch.zeros(length // block_size + 1, dtype=torch.long).index_add_(
        0, torch.arange(length) // block_size, scorable.long())[torch.arange(length) // block_size]
    total = torch.zeros(rows, dtype=torch.float64)
    for size in range(1, block_size + 1):
        for pattern in itertools.combinations(range(block_size), size):
            masked = torch.isin(position, torch.tensor(pattern)) & scorable
            logits = two_l_logits(model, ids.masked_fill(masked, mask_id), ids, block_size=block_size)[:, :-1].float()
            logits[..., mask_id] = -math.inf
            ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(rows, -1)
            m = masked[1:] & ~((torch.arange(1, length) < block_size) & (0 in pattern))  # block 0: S ∌ context
            l = torch.zeros(length // block_size + 1, dtype=torch.long).index_add_(
                0, torch.arange(length) // block_size, masked.long())[torch.arange(length) // block_size][1:]
            n = n_block[1:]
            # the estimator picks this l with probability 1/N, this subset with 1/C(N, l), and scores (N/l)·Σ CE
            weight = 1.0 / (torch.tensor([math.comb(int(a), int(b)) for a, b in zip(n, l)],
                                         dtype=torch.float64) * l.clamp_min(1).double())
            total += (ce.double() * weight * m).sum(1)
    return total / scorable.sum()


def main():
    import adapt
    from adapt.config import DataConfig
    from adapt.training.data import load_documents, pack
    from adapt.training.likelihood import elbo_draws, stratified_variance

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--draws", type=int, default=64)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--block-sizes", default="2,4")
    p.add_argument("--write", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    model, tok = adapt.load(a.model)
    ids = pack(load_documents(str(VALID), DataConfig()), tok, 128, "validation", max_rows=a.rows)
    lines = [TITLE, "", f"{time.strftime('%Y-%m-%d')}, {os.uname().machine} CPU, torch {torch.__version__}. Model "
             f"`{a.model}`; the first {a.rows} validation sequences of 128 tokens; K = {a.draws} draws per "
             f"sequence, {a.seeds} independent seeds. Command: `python benchmarks/elbo_stderr.py {a.model} --rows "
             f"{a.rows} --draws {a.draws} --seeds {a.seeds}`.", "",
             "| block size | exact bound | mean of the estimates − exact | real spread (std over seeds) | "
             "reported stderr, collapsed strata (now) | ÷ real | reported, draws as independent (before) | ÷ real |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in (int(x) for x in a.block_sizes.split(",")):
        exact_rows = exact_bound(model, ids, b)
        exact = float(exact_rows.mean())  # every row scores the same number of tokens
        estimates, now, before = [], [], []
        for seed in range(a.seeds):
            values, scored, _ = elbo_draws(model, ids, mc_samples=a.draws, batch_size=64, seed=seed, block_size=b)
            w = scored.double() / scored.sum()
            estimates.append(float((values.mean(1) * w).sum()))
            now.append(float((stratified_variance(values) * w ** 2).sum().sqrt()))
            before.append(float((values.var(1) * w ** 2).sum().div(a.draws).sqrt()))
        est = torch.tensor(estimates, dtype=torch.float64)
        real = float(est.std())
        now_se, before_se = sum(now) / len(now), sum(before) / len(before)
        lines.append(f"| {b} | {exact:.4f} | {float(est.mean()) - exact:+.4f} | {real:.4f} | {now_se:.4f} | "
                     f"{now_se / real:.2f} | {before_se:.4f} | {before_se / real:.2f} |")
        print(lines[-1], flush=True)
    section = "\n".join(lines) + "\n"
    print(section)
    if a.write:
        from results_md import write_section

        write_section(HERE / "RESULTS.md", TITLE, section)


if __name__ == "__main__":
    main()
