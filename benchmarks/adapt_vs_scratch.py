"""Adaptation vs training from scratch on stories260K + TinyStories: validation ELBO against optimizer steps.

Runs, all on the same validation sequences (the first 64 sequences of 128 tokens of valid.txt, token 0 of each sequence
as context, so every number scores the same 8128 tokens):
  (a) the AR parent's exact NLL;
  (b) the freshly converted model's ELBO (no training);
  (c) adapted with attention-mask annealing (recipes/adaptation/stories260k.yaml, anneal over the first third);
  (d) adapted without annealing (bidirectional from step 0);
  (e) adapted without shift (annealed as in (c));
  (f) the same architecture from a random init trained as a diffusion model, same recipe, steps and data
      (no annealing: there is no causal skill to keep);
  (g), (h), (i) block diffusion (adapt/blocks.py; recipes/adaptation/stories260k-block.yaml): block size 4 after
      a schedule 1 → 2 → 4, block size 16 after 1 → 4 → 16 (each stage a tenth of the steps), and block size 4
      from step 1. Their ELBO is the block-wise bound (each block given the clean blocks before it).
Every run is `adapt.train` with YAML overrides of the stories260k recipe. The curve is training's own `val_elbo`
(one draw per sequence, fixed seed) plus the same estimate before step 1; the final row is `dlm-adapt eval`'s ELBO
with --mc-samples draws per sequence and its standard error. Appends (or, on a rerun with the same steps and
runs, replaces) a section of benchmarks/RESULTS.md and writes benchmarks/adapt_vs_scratch-STEPS.png.

    nice -n 10 python benchmarks/adapt_vs_scratch.py [--steps 2500] [--eval-steps 250] [--threads 1] [--only cdefghi]
One thread: on a loaded 2-core machine a second torch thread mostly spin-waits (measured: 25x the CPU time
per step).
Needs ../shared beside the checkout.
"""

import argparse
import datetime
import json
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from results_md import write_section  # benchmarks/ is the script's directory

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SOURCE = SHARED / "models" / "stories260K"
TRAIN, VALID = SHARED / "data" / "tinystories" / "train.txt", SHARED / "data" / "tinystories" / "valid.txt"
RECIPE = ROOT / "recipes" / "adaptation" / "stories260k.yaml"
SEQ_LENGTH, SEQUENCES = 128, 64


def runs(steps: int) -> dict:
    anneal = max(1, steps // 3)
    stage = max(1, steps // 10)
    return {
        "(c) adapted, annealing": dict(source=SOURCE, shift=True, overrides=["anneal.mode=diffullama",
                                                                         f"anneal.anneal_steps={anneal}"]),
        "(d) adapted, no annealing": dict(source=SOURCE, shift=True, overrides=["anneal.mode=none"]),
        "(e) adapted, no shift": dict(source=SOURCE, shift=False, overrides=["anneal.mode=diffullama",
                                                                         f"anneal.anneal_steps={anneal}"]),
        "(f) scratch (random init)": dict(source=None, shift=True, overrides=["anneal.mode=none"]),
        # block diffusion (recipes/adaptation/stories260k-block.yaml's settings): 2L layout, blocks replace annealing
        "(g) block 4, schedule 1→2→4": dict(source=SOURCE, shift=True, block=4, overrides=[
            "anneal.mode=none", "block.size=4", "block.schedule=[1,2,4]", f"block.stage_steps={stage}"]),
        "(h) block 16, schedule 1→4→16": dict(source=SOURCE, shift=True, block=16, overrides=[
            "anneal.mode=none", "block.size=16", "block.schedule=[1,4,16]", f"block.stage_steps={stage}"]),
        "(i) block 4, no schedule": dict(source=SOURCE, shift=True, block=4, overrides=[
            "anneal.mode=none", "block.size=4"]),
    }


def random_init_source(path: Path) -> Path:
    """stories260K's architecture and tokenizer with freshly initialised weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(SOURCE)).save_pretrained(path)
        AutoTokenizer.from_pretrained(SOURCE).save_pretrained(path)
    return path


def one_run(name: str, spec: dict, out: Path, args) -> dict:
    import adapt
    from adapt.config import load_config
    from adapt import evaluate
    from adapt.training.likelihood import diffusion_elbo
    from adapt.training.data import load_documents, pack
    from adapt.config import DataConfig

    source = spec["source"] or random_init_source(out.parent / "random-init")
    converted = out.with_name(out.name + "-start")  # the untrained conversion; train() makes its own OUTPUT/converted
    adapt.convert(source, converted, shift=spec["shift"], overwrite=True)
    model, tok = adapt.load(converted)
    sequences = pack(load_documents(str(VALID), DataConfig()), tok, SEQ_LENGTH, "validation", max_rows=SEQUENCES)
    block = spec.get("block")  # the converted model scored as the block model it is about to become
    step0 = diffusion_elbo(model, sequences, mc_samples=1, batch_size=16, seed=1234,
                           block_size=block)["elbo_nats_per_token"]
    start = diffusion_elbo(model, sequences, mc_samples=args.mc_samples, batch_size=16, seed=0, block_size=block)
    cfg = load_config(RECIPE, [f"output_dir={out}", f"model.path={source}", f"model.shift={spec['shift']}",
                               f"max_steps={args.steps}", f"eval_steps={args.eval_steps}", "save_steps=0",
                               "sample_steps=0", f"data.train={TRAIN}", f"data.validation={VALID}",
                               f"data.seq_length={SEQ_LENGTH}", f"data.max_eval_sequences={SEQUENCES}", *args.override,
                               *spec["overrides"]])
    wall, cpu = time.perf_counter(), time.process_time()
    final = adapt.train(cfg)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = {0: step0, **{r["step"]: r["val_elbo"] for r in records if "val_elbo" in r}}
    final_eval = evaluate(str(final), str(VALID), seq_length=SEQ_LENGTH, num_sequences=SEQUENCES,
                          mc_samples=args.mc_samples)["elbo"]
    print(f"[{name}] {wall:.0f} s wall, {cpu / 60:.1f} CPU-min, final ELBO {final_eval['elbo_nats_per_token']:.3f} "
          f"± {final_eval['stderr']:.3f}", file=sys.stderr)
    return {"curve": curve, "start": start, "final": final_eval, "wall_s": wall, "cpu_s": cpu, "overrides": spec["overrides"],
            "shift": spec["shift"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--eval-steps", type=int, default=250)
    ap.add_argument("--mc-samples", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override applied to every run (repeatable), e.g. train.lr=1e-2")
    ap.add_argument("--only", help="run letters to do, e.g. cd (default: all)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "adapt_vs_scratch")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    ap.add_argument("--plot", type=Path, help="default: benchmarks/adapt_vs_scratch-STEPS.png")
    args = ap.parse_args()
    args.plot = args.plot or ROOT / "benchmarks" / f"adapt_vs_scratch-{args.steps}.png"
    if not SOURCE.is_dir():
        sys.exit(f"needs {SOURCE}")
    torch.set_num_threads(args.threads)
    import adapt

    started = time.perf_counter()
    ar = adapt.evaluate(str(SOURCE), str(VALID), seq_length=SEQ_LENGTH, num_sequences=SEQUENCES)["elbo"]
    results = {}
    selected = runs(args.steps)
    if args.only:
        selected = {k: v for k, v in selected.items() if k[1] in args.only}
    for name, spec in selected.items():
        out = args.out_dir / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        results[name] = one_run(name, spec, out, args)
    total = time.perf_counter() - started
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps({"ar": ar, "runs": results}, indent=2, default=str))
    command = " ".join(["nice -n 10 python benchmarks/adapt_vs_scratch.py", *sys.argv[1:]])
    section = report(ar, results, args, total, command)
    plot(ar, results, args.plot)
    write_section(args.results, heading(args), section)
    print(section)


def report(ar, results, args, total, command) -> str:
    nll = ar["nll_nats_per_token"]
    names = list(results)
    steps = sorted({s for r in results.values() for s in r["curve"]})
    lines = [heading(args), "",
             f"{datetime.date.today()}, {platform.machine()} CPU, torch {torch.__version__}, {args.threads} threads, "
             f"`nice -n 10` on a machine shared with other jobs. Command: `{command}` ({total / 60:.1f} min wall "
             f"in all). Validation: the first {SEQUENCES} sequences of {SEQ_LENGTH} tokens of valid.txt, "
             f"{ar['tokens']} scored tokens. Training: recipes/adaptation/stories260k.yaml (batch 16 × 128 tokens, "
             f"lr 3e-3 cosine, full fine-tuning) for {args.steps} steps on train.txt "
             f"({args.steps * 16 * SEQ_LENGTH / 1e6:.2f} M tokens seen, ≈{args.steps * 16 / 772:.0f} epochs of its 772 sequences).",
             "",
             f"(a) AR parent, exact NLL: **{nll:.3f}** nats/token (perplexity {ar['ppl']:.2f}).",
             "",
             "(b) before training, ELBO with the same estimator as the final row: " + "; ".join(
                 f"{n}: {r['start']['elbo_nats_per_token']:.3f} ± {r['start']['stderr']:.3f}"
                 for n, r in results.items()) + ".",
             "",
             "Validation ELBO (nats/token, upper bound on the NLL) against optimizer steps; step 0 is the converted, "
             "untrained model, (b). Curve values: one draw per sequence; last row: "
             f"{args.mc_samples} draws per sequence ± standard error.",
             "",
             "| step | " + " | ".join(names) + " |",
             "|---:|" + "---:|" * len(names)]
    for s in steps:
        cells = [f"{results[n]['curve'][s]:.3f}" if s in results[n]["curve"] else "" for n in names]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    finals = {n: results[n]["final"] for n in names}
    lines.append(f"| final, K={args.mc_samples} | " + " | ".join(
        f"**{f['elbo_nats_per_token']:.3f}** ± {f['stderr']:.3f}" for f in finals.values()) + " |")
    lines.append("| ÷ AR NLL | " + " | ".join(f"{f['elbo_nats_per_token'] / nll:.3f}" for f in finals.values()) + " |")
    lines.append("| wall / CPU min | " + " | ".join(
        f"{results[n]['wall_s'] / 60:.1f} / {results[n]['cpu_s'] / 60:.1f}" for n in names) + " |")
    lines += ["", f"![ELBO against steps]({args.plot.name})", ""]
    return "\n".join(lines) + "\n"


def plot(ar, results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nll = ar["nll_nats_per_token"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in results.items():
        steps = sorted(r["curve"])
        ax.plot(steps, [r["curve"][s] for s in steps], "o-", ms=3, label=name)
    ax.axhline(nll, color="k", lw=1, label=f"AR parent NLL {nll:.3f}")
    ax.axhline(1.10 * nll, color="k", lw=1, ls="--", label="1.10 × AR NLL")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("validation ELBO (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("stories260K on TinyStories: adaptation vs scratch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def heading(args) -> str:
    runs_done = f", runs {args.only}" if args.only else ""
    return f"# Adaptation vs scratch, {args.steps} steps{runs_done} (benchmarks/adapt_vs_scratch.py)"




if __name__ == "__main__":
    main()
