"""Decoding strategies on an adapted stories260K vs its AR parent's KV-cached `generate`.

For each strategy: tokens committed per forward pass; wall time per generated token ÷ the AR parent's (greedy, KV
cache, same prompts, same number of new tokens), measured side by side in this process both with every prompt
decoded alone (batch 1: latency, where parallel decoding pays) and with all prompts as one batch; and quality:
the AR parent's NLL (nats/token) of the generated continuation (lower is better) with the share of distinct
tokens (a repetition guard: repeated text is cheap for the NLL). Decoding is batch invariant (tested), so the
tokens and the quality columns are the same for both batch sizes. Writes a Markdown table with the issue's
targets checked into benchmarks/RESULTS.md (or --out).

    python benchmarks/decode.py [--model runs/stories/final] [--new 64] [--prompts 16]
If --model is missing, the stories260K recipe is run first (about half a minute on CPU); needs ../shared.
"""

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch
from results_md import write_section  # benchmarks/ is the script's directory

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def adapted_model(path: Path) -> Path:
    if (path / "config.json").exists():
        return path
    import adapt
    from adapt.config import load_config

    out = path.parent
    adapt.train(load_config(ROOT / "recipes/adaptation/stories260k.yaml", [f"output_dir={out}",
                f"model.path={SHARED / 'models/stories260K'}", f"data.train={SHARED / 'data/tinystories/train.txt'}",
                f"data.validation={SHARED / 'data/tinystories/valid.txt'}", "sample_steps=0", "resume=false"]))
    return out / "final"


@torch.no_grad()
def ar_nll(ar, prompts, generated):
    ids = torch.cat([prompts, generated], 1)
    logp = ar(ids).logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    return -logp[:, prompts.shape[1] - 1:].mean().item()


def distinct(gen: torch.Tensor) -> float:
    return statistics.mean(len(set(row.tolist())) / len(row) for row in gen)


def seconds_per_token(decode, prompts, new, repeats, alone):
    """Median over `repeats` of the wall time per generated token, decoding `prompts` as one batch or one by one."""
    groups = [p[None] for p in prompts] if alone else [prompts]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for g in groups:
            decode(g)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / (new * len(prompts))


SETTINGS = [  # (name, diffusion_generate arguments for N new tokens); the first is the quality reference
    ("low_confidence, blocks of 8, 1 token/step", lambda n: dict(steps=n, block_length=8)),
    ("low_confidence, one block, 1 token/step", lambda n: dict(steps=n)),
    ("margin, blocks of 8, 1 token/step", lambda n: dict(steps=n, block_length=8, remasking="margin")),
    ("entropy, blocks of 8, 1 token/step", lambda n: dict(steps=n, block_length=8, remasking="entropy")),
    ("random, blocks of 8, 1 token/step", lambda n: dict(steps=n, block_length=8, remasking="random")),
    ("low_confidence, blocks of 8, 2 tokens/step", lambda n: dict(steps=n // 2, block_length=8)),
    ("low_confidence, blocks of 8, 4 tokens/step", lambda n: dict(steps=n // 4, block_length=8)),
    ("low_confidence, blocks of 8, 8 tokens/step", lambda n: dict(steps=n // 8, block_length=8)),
    ("low_confidence, one block, 4 tokens/step", lambda n: dict(steps=n // 4)),
    ("blocks of 8, 1 token/step, prefix cache", lambda n: dict(steps=n, block_length=8, kv_cache="prefix")),
    ("blocks of 8, 1 token/step, dual cache", lambda n: dict(steps=n, block_length=8, kv_cache="dual")),
    ("blocks of 8, 4 tokens/step, prefix cache", lambda n: dict(steps=n // 4, block_length=8, kv_cache="prefix")),
    ("blocks of 8, 4 tokens/step, dual cache", lambda n: dict(steps=n // 4, block_length=8, kv_cache="dual")),
    ("threshold 0.9, blocks of 8", lambda n: dict(steps=n, block_length=8, threshold=0.9)),
    ("threshold 0.7, blocks of 8", lambda n: dict(steps=n, block_length=8, threshold=0.7)),
    ("threshold 0.5, blocks of 8", lambda n: dict(steps=n, block_length=8, threshold=0.5)),
    ("threshold 0.3, blocks of 8", lambda n: dict(steps=n, block_length=8, threshold=0.3)),
    ("threshold 0.9, blocks of 8, dual cache", lambda n: dict(steps=n, block_length=8, threshold=0.9,
                                                              kv_cache="dual")),
    ("threshold 0.5, blocks of 8, dual cache", lambda n: dict(steps=n, block_length=8, threshold=0.5,
                                                              kv_cache="dual")),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "runs/stories/final")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    import adapt

    model_path = adapted_model(args.model)
    dlm, tok = adapt.load(model_path)
    ar = AutoModelForCausalLM.from_pretrained(SHARED / "models/stories260K").eval()
    texts = [t for t in (SHARED / "data/tinystories/valid.txt").read_text().split("\n\n") if t.strip()]
    rows = [tok(t).input_ids[: args.prompt_tokens] for t in texts]
    prompts = torch.tensor([r for r in rows if len(r) == args.prompt_tokens][: args.prompts])
    n = args.new

    def ar_decode(p):
        return ar.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)

    ar_gen = ar_decode(prompts)[:, prompts.shape[1]:]
    ar_time = {alone: seconds_per_token(ar_decode, prompts, n, args.repeats, alone) for alone in (True, False)}
    results = [("AR parent, KV-cached greedy", 1.0, 1.0, 1.0, ar_nll(ar, prompts, ar_gen), distinct(ar_gen))]
    for name, setting in SETTINGS:
        kw = setting(n)

        def decode(p, kw=kw):
            return dlm.diffusion_generate(p, max_new_tokens=n, stop_at_eos=False, return_dict_in_generate=True, **kw)

        out = decode(prompts)
        gen = out.sequences[:, prompts.shape[1]:]
        ratio = {alone: seconds_per_token(decode, prompts, n, args.repeats, alone) / ar_time[alone]
                 for alone in (True, False)}
        results.append((name, out.tokens_per_forward, ratio[True], ratio[False], ar_nll(ar, prompts, gen),
                        distinct(gen)))

    reference = results[1][4]
    parallel = [r for r in results[1:] if r[1] >= 4 and r[4] <= 1.05 * reference]
    fastest = min(results[1:], key=lambda r: r[2])
    lines = [
        "# Decoding benchmark (benchmarks/decode.py)",
        "",
        f"{datetime.date.today()}, {platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads. Model: `{model_path}`. {len(prompts)} validation prompts of {args.prompt_tokens} tokens, {n} new "
        f"tokens each, temperature 0, median of {args.repeats} runs. AR parent: "
        f"{ar_time[True] * 1e3:.3f} ms per token alone, {ar_time[False] * 1e3:.3f} ms per token in a batch of "
        f"{len(prompts)}. Time ratios < 1 mean faster than the AR parent.",
        "",
        f"| strategy | tokens / forward | time per token ÷ AR, batch 1 | time per token ÷ AR, batch {len(prompts)} "
        "| AR-parent NLL of output (nats/token) | distinct tokens |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {name} | {tpf:.2f} | {r1:.2f} | {rb:.2f} | {nll:.3f} | {dist:.0%} |"
              for name, tpf, r1, rb, nll, dist in results]
    lines += [
        "",
        f"Targets (issue 4), quality reference: {results[1][0]}, NLL {reference:.3f}.",
        f"- ≥ 4 tokens per forward within 5% of it (NLL ≤ {1.05 * reference:.3f}): "
        + (", ".join(f"met by {r[0]} ({r[1]:.2f} tokens/forward, NLL {r[4]:.3f})" for r in parallel)
           if parallel else "not met"),
        f"- time per token ≤ 0.5× the AR parent's: {'met' if fastest[2] <= 0.5 else 'not met'}; fastest at batch 1: "
        f"{fastest[0]} ({fastest[2]:.2f}×, NLL {fastest[4]:.3f})",
    ]
    write_section(args.out, lines[0], "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
