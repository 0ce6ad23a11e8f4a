"""Decoding strategies on an adapted stories260K vs its AR parent's KV-cached `generate`.

For each strategy: tokens committed per forward pass, wall time per generated token ÷ the AR parent's
(greedy, KV cache, same prompts, same number of new tokens), and quality: the AR parent's NLL (nats/token) of
the generated continuation (lower is better) with the share of distinct tokens (a repetition guard: repeated
text is cheap for the NLL). Writes a Markdown table to benchmarks/RESULTS.md (or --out).

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


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "runs/stories/final")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM

    import adapt

    model_path = adapted_model(args.model)
    dlm, tok = adapt.load(model_path)
    ar = AutoModelForCausalLM.from_pretrained(SHARED / "models/stories260K").eval()
    texts = [t for t in (SHARED / "data/tinystories/valid.txt").read_text().split("\n\n") if t.strip()]
    rows = [tok(t).input_ids[: args.prompt_tokens] for t in texts]
    prompts = torch.tensor([r for r in rows if len(r) == args.prompt_tokens][: args.prompts])
    n = args.new

    (ar_out, ar_time) = timed(lambda: ar.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                 eos_token_id=None, pad_token_id=0), args.repeats)
    ar_gen = ar_out[:, prompts.shape[1]:]
    ar_per_token = ar_time / (n * len(prompts))
    results = [("AR parent, KV-cached greedy", 1.0, 1.0, ar_nll(ar, prompts, ar_gen), distinct(ar_gen))]
    settings = [
        ("low_confidence, 1 token/step", dict(steps=n)),
        ("low_confidence, blocks of 8, 1 token/step", dict(steps=n, block_length=8)),
        ("low_confidence, blocks of 8, 2 tokens/step", dict(steps=n // 2, block_length=8)),
        ("low_confidence, blocks of 8, 4 tokens/step", dict(steps=n // 4, block_length=8)),
        ("low_confidence, blocks of 8, 8 tokens/step", dict(steps=n // 8, block_length=8)),
        ("low_confidence, 4 tokens/step (one block)", dict(steps=n // 4)),
        ("margin, blocks of 8, 1 token/step", dict(steps=n, block_length=8, remasking="margin")),
        ("entropy, blocks of 8, 1 token/step", dict(steps=n, block_length=8, remasking="entropy")),
        ("random, blocks of 8, 1 token/step", dict(steps=n, block_length=8, remasking="random")),
        ("low_confidence, blocks of 8, 1 token/step, prefix cache", dict(steps=n, block_length=8, prefix_cache=True)),
        ("low_confidence, blocks of 8, 4 tokens/step, prefix cache", dict(steps=n // 4, block_length=8,
                                                                          prefix_cache=True)),
        ("threshold 0.9, blocks of 8", dict(steps=n, block_length=8, threshold=0.9)),
        ("threshold 0.5, blocks of 8", dict(steps=n, block_length=8, threshold=0.5)),
        ("threshold 0.1, blocks of 8", dict(steps=n, block_length=8, threshold=0.1)),
    ]
    for name, kw in settings:
        def run(kw=kw):
            return dlm.diffusion_generate(prompts, max_new_tokens=n, stop_at_eos=False, return_dict_in_generate=True,
                                          generator=torch.Generator().manual_seed(0), **kw)
        out, seconds = timed(run, args.repeats)
        gen = out.sequences[:, prompts.shape[1]:]
        results.append((name, out.tokens_per_forward, seconds / (n * len(prompts)) / ar_per_token,
                        ar_nll(ar, prompts, gen), distinct(gen)))

    lines = [
        "# Decoding benchmark (benchmarks/decode.py)",
        "",
        f"{datetime.date.today()}, {platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads. Model: `{model_path}` (stories260K adapted by recipes/adaptation/stories260k.yaml). "
        f"{len(prompts)} validation prompts of {args.prompt_tokens} tokens decoded as one batch, {n} new tokens "
        f"each, temperature 0, median of {args.repeats} runs. AR parent: {ar_per_token * 1e3:.3f} ms per token.",
        "",
        "| strategy | tokens / forward | time per token ÷ AR | AR-parent NLL of output (nats/token) | distinct tokens |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {name} | {tpf:.2f} | {ratio:.2f} | {nll:.3f} | {dist:.0%} |" for name, tpf, ratio, nll, dist in results]
    write_section(args.out, lines[0], "\n".join(lines) + "\n")
    print("\n".join(lines))


def distinct(gen: torch.Tensor) -> float:
    return statistics.mean(len(set(row.tolist())) / len(row) for row in gen)


if __name__ == "__main__":
    main()
