"""Ablation of the options that keep the parent's knowledge (issue 26) on stories260K, block size 4: run (g)'s settings
in benchmarks/adapt_vs_scratch.py (recipes/adaptation/stories260k.yaml with its block overrides) for --steps
optimizer steps (run (g): 1200; the shipped block recipe: 300), the block schedule's stages a tenth each.

Rows: today's recipe (run (g)), each option alone, combinations, and the best at half the learning rate. Columns,
on the 64 validation sequences of 128 tokens of valid.txt that adapt_vs_scratch.py scores:
- block ELBO (16 draws per sequence, seed 0) ÷ the AR parent's exact NLL;
- block-start NLL − the parent's on the same tokens (`adapt.training.forgetting`; > 0 is forgetting);
- AR-mode NLL: the checkpoint as its causal self (`is_causal=True`), exact when `block.clean_attention=causal`;
- lm-eval on TinyStories (benchmarks/lm_eval_stories.py's tasks, 100 paragraphs each): cloze accuracy
  (`is_greedy`) and next-sentence accuracy (acc and acc_norm), ELBO with --mc-samples draws per request.

    python benchmarks/retention_ablation.py --train --rows base,ar,... [--out-dir runs/retention]   # train + score
    python benchmarks/retention_ablation.py --rows base,ar,... --write   # score what is trained, write RESULTS.md

One torch thread per run. Each run's scores are cached in OUT/NAME/ablation.json.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
SHARED = HERE.parent.parent / "shared"
SOURCE, VALID = SHARED / "models" / "stories260K", SHARED / "data" / "tinystories" / "valid.txt"
RECIPE = HERE.parent / "recipes" / "adaptation" / "stories260k.yaml"


def title(steps: int) -> str:
    """One RESULTS.md section per budget: a 1200-step rerun keeps the 300-step table."""
    return (f"# Keeping the parent's knowledge: ablation, stories260K block 4, {steps} steps "
            "(benchmarks/retention_ablation.py)")


def run_g(steps: int) -> list[str]:
    """Run (g)'s overrides at `steps` optimizer steps."""
    return [f"max_steps={steps}", f"eval_steps={steps // 4}", "save_steps=0", "sample_steps=0", "anneal.mode=none",
            "block.size=4", "block.schedule=[1,2,4]", f"block.stage_steps={steps // 10}"]


CAUSAL, AR = ["block.clean_attention=causal"], ["objective.ar_loss_weight=0.5"]
ROWS = {
    "base": ("today's recipe, run (g): lr 3e-3", []),
    "causal": ("token-causal clean stream", CAUSAL),
    "ar": ("AR loss λ = 0.5 (causal clean stream)", CAUSAL + AR),
    "pos": ("position masking c = 1", ["objective.position_masking=1"]),
    "distill": ("distillation μ = 0.5", ["objective.distill_weight=0.5"]),
    "ar_distill": ("AR loss + distillation", CAUSAL + AR + ["objective.distill_weight=0.5"]),
    "all": ("AR loss + distillation + position masking", CAUSAL + AR + ["objective.distill_weight=0.5",
                                                                         "objective.position_masking=1"]),
    "ar_half": ("AR loss, lr 1.5e-3", CAUSAL + AR + ["train.lr=1.5e-3"]),
    "ar_distill_half": ("AR loss + distillation, lr 1.5e-3", CAUSAL + AR + ["objective.distill_weight=0.5",
                                                                            "train.lr=1.5e-3"]),
    "all_half": ("AR loss + distillation + position masking, lr 1.5e-3",
                 CAUSAL + AR + ["objective.distill_weight=0.5", "objective.position_masking=1", "train.lr=1.5e-3"]),
}


def train(name: str, out: Path, steps: int):
    import adapt
    from adapt.config import load_config

    overrides = [f"output_dir={out / name}", f"model.path={SOURCE}", f"data.train={VALID.parent / 'train.txt'}",
                 f"data.validation={VALID}", *run_g(steps), *ROWS[name][1]]
    start, cpu = time.perf_counter(), time.process_time()
    adapt.train(load_config(str(RECIPE), overrides))
    (out / name / "timing.json").write_text(json.dumps({"wall_s": time.perf_counter() - start,
                                                        "cpu_s": time.process_time() - cpu}))


def lm_eval_scores(model: str, backend: str, args: str, work: Path, mc_samples: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import adapt.evaluation.lm_eval_backend  # noqa: F401 (registers --model dlm-adapt)

    manager = TaskManager(include_path=str(work), include_defaults=False)
    extra = f",mc_samples={mc_samples},seed=0" if backend == "dlm-adapt" else ",device=cpu"
    r = lm_eval.simple_evaluate(model=backend, model_args=f"pretrained={model}{extra}{args}",
                                tasks=["stories_cloze", "stories_next"], task_manager=manager, batch_size=64,
                                log_samples=False)["results"]
    return {"cloze_acc": r["stories_cloze"]["acc,none"], "next_acc": r["stories_next"]["acc,none"],
            "next_acc_norm": r["stories_next"]["acc_norm,none"]}


def score(path: Path, work: Path, mc_samples: int, lm_eval: bool = True) -> dict:
    import adapt
    from adapt.config import DataConfig
    from adapt.training.data import load_documents, pack
    from adapt.training.forgetting import forgetting
    from adapt.training.likelihood import diffusion_elbo
    from transformers import AutoModelForCausalLM

    model, tok = adapt.load(str(path))
    parent = AutoModelForCausalLM.from_pretrained(SOURCE).eval()
    sequences = pack(load_documents(str(VALID), DataConfig()), tok, 128, "validation", max_rows=64)
    elbo = diffusion_elbo(model, sequences, mc_samples=16, batch_size=64, seed=0)
    kept = forgetting(model, sequences, batch_size=64, seed=0, parent=parent)
    return {"elbo": elbo["elbo_nats_per_token"], "elbo_stderr": elbo["stderr"], **kept,
            **(lm_eval_scores(str(path), "dlm-adapt", "", work, mc_samples) if lm_eval else {})}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--out-dir", default=str(HERE.parent / "runs" / "retention"))
    p.add_argument("--train", action="store_true", help="train the rows whose OUT/NAME/final is missing")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps of every run (run (g): 1200)")
    p.add_argument("--paragraphs", type=int, default=100, help="lm-eval documents per task")
    p.add_argument("--mc-samples", type=int, default=4, help="ELBO draws per lm-eval request")
    p.add_argument("--no-lm-eval", action="store_true", help="score rows not yet scored without lm-eval")
    p.add_argument("--write", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    a = p.parse_args()
    torch.set_num_threads(1)
    out, rows = Path(a.out_dir), [r for r in a.rows.split(",") if r]
    from lm_eval_stories import build_tasks

    work = Path(tempfile.mkdtemp(prefix="retention-"))
    build_tasks(work, VALID, a.paragraphs)
    results = {}
    for name in rows:
        if a.train and not (out / name / "final" / "config.json").exists():
            train(name, out, a.steps)
        cached = out / name / "ablation.json"
        if not cached.exists() and (out / name / "final" / "config.json").exists():
            cached.write_text(json.dumps(score(out / name / "final", work, a.mc_samples, not a.no_lm_eval),
                                         indent=1))
        if cached.exists():
            results[name] = json.loads(cached.read_text())
            print(name, json.dumps(results[name]), flush=True)
    parent_cache = out / "parent.json"
    if not parent_cache.exists():
        parent_cache.write_text(json.dumps(lm_eval_scores(str(SOURCE), "hf", "", work, a.mc_samples)))
    parent = json.loads(parent_cache.read_text())
    section = table(results, parent, out, a)
    print(section)
    if a.write:
        from results_md import write_section

        write_section(HERE / "RESULTS.md", title(a.steps), section)


def lm(r: dict, key: str) -> str:
    return f"{r[key]:.2f}" if key in r else "not measured"


def table(results: dict, parent: dict, out: Path, a) -> str:
    first = next(iter(results.values()))
    ar = first["parent_nll"]
    lines = [title(a.steps), "", f"{time.strftime('%Y-%m-%d')}, {os.uname().machine} CPU, torch {torch.__version__}, one "
             "thread per run, 2 cores shared with other agents' jobs (wall times are not comparable between rows; "
             "CPU minutes are). Training: recipes/adaptation/stories260k.yaml with run (g)'s overrides at "
             f"{a.steps} steps (`{' '.join(run_g(a.steps))}`) plus each row's; batch 16 × 128 tokens, lr 3e-3 cosine. Validation: the first 64 sequences of "
             f"128 tokens of valid.txt ({first['tokens']} scored tokens, {first['block_start_tokens']} of them "
             f"block starts). AR parent: NLL **{ar:.3f}**, block-start NLL {first['parent_block_start_nll']:.3f}, "
             f"cloze {parent['cloze_acc']:.2f}, next-sentence {parent['next_acc']:.2f} (acc_norm "
             f"{parent['next_acc_norm']:.2f}). lm-eval: {a.paragraphs} paragraphs per task, {a.mc_samples} ELBO "
             f"draws per request. Command: `python benchmarks/retention_ablation.py --train --steps {a.steps} "
             f"--paragraphs {a.paragraphs} --rows {','.join(results)} --write`.", "",
             "| row | overrides | block ELBO ÷ AR NLL | block-start NLL − parent's | AR-mode NLL | "
             "l = 1 / 2 / 3 / 4 masked (CE per masked token) | cloze acc | next-sentence acc (norm) | CPU min |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for name, r in results.items():
        timing = out / name / "timing.json"
        cpu = f"{json.loads(timing.read_text())['cpu_s'] / 60:.1f}" if timing.exists() else "–"
        per_l = " / ".join(f"{v:.2f}" for v in r["masked_per_block"].values())
        over = " ".join(f"`{o}`" for o in ROWS[name][1]) or "–"
        mode = f"{r['ar_nll']:.3f}" + ("" if r["clean_attention"] == "causal" else " (no AR mode trained)")
        lines.append(f"| {ROWS[name][0]} | {over} | {r['elbo'] / ar:.3f} ({r['elbo']:.3f} ± {r['elbo_stderr']:.3f}) "
                     f"| {r['block_start_change']:+.3f} | {mode} | {per_l} | {lm(r, 'cloze_acc')} | "
                     f"{lm(r, 'next_acc')} ({lm(r, 'next_acc_norm')}) | {cpu} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
