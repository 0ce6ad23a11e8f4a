"""Ablation of the options that keep the parent's knowledge (issue 26) at block size 4, on two parents (--model):
- `stories` (default): stories260K with run (g)'s settings in benchmarks/adapt_vs_scratch.py
  (recipes/adaptation/stories260k.yaml with its block overrides) for --steps optimizer steps (run (g): 1200; the
  shipped block recipe: 300), the block schedule's stages a tenth each; scored on the 64 validation sequences of 128
  tokens of valid.txt that adapt_vs_scratch.py scores;
- `smollm2`: SmolLM2-135M-Instruct (the Q4_1 GGUF in ../shared/models) with LoRA,
  recipes/adaptation/smollm2-135m-block-lora.yaml at --steps (its stages a fifth each, as the recipe's);
  scored on the first 16 validation sequences of 256 tokens (as benchmarks/adapt_smollm2.sh).

Rows: no options (run (g)), each option alone, combinations, and the best at half the learning rate. Columns:
- block ELBO (16 draws per sequence, seed 0) ÷ the AR parent's exact NLL;
- block-start NLL − the parent's on the same tokens (`adapt.training.forgetting`; > 0 is forgetting), over all
  tokens and within documents (without the packing's separators and the token after each: document boundaries,
  which the parent predicts from the previous document alone and an adaptation learns at once: `within_documents`);
- AR-mode NLL: the checkpoint as its causal self (`is_causal=True`), exact when `block.clean_attention=causal`;
- lm-eval on TinyStories (benchmarks/lm_eval_stories.py's tasks, --paragraphs each): cloze accuracy
  (`is_greedy`) and next-sentence accuracy (acc and acc_norm), ELBO with --mc-samples draws per request.

    python benchmarks/retention_ablation.py --train --rows base,ar,... [--out-dir runs/retention]   # train + score
    python benchmarks/retention_ablation.py --rows base,ar,... --write   # score what is trained, write RESULTS.md
    python benchmarks/retention_ablation.py --model smollm2 --train --steps N --rows ar_distill --paragraphs 50

One torch thread per run. Each run's scores are cached in OUT/NAME/ablation.json, the parent's lm-eval scores in
OUT/parent.json.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
SHARED = HERE.parent.parent / "shared"
VALID, RECIPES = SHARED / "data" / "tinystories" / "valid.txt", HERE.parent / "recipes" / "adaptation"


def run_g(steps: int) -> list[str]:
    """Run (g)'s overrides at `steps` optimizer steps."""
    return [f"max_steps={steps}", f"eval_steps={steps // 4}", "save_steps=0", "sample_steps=0", "anneal.mode=none",
            "block.size=4", "block.schedule=[1,2,4]", f"block.stage_steps={steps // 10}"]


def smollm2_steps(steps: int) -> list[str]:
    """The LoRA block recipe at `steps`, its stages a fifth each (18 of its 90), at batch 1 (its batch before issue
    26, 4 × 2 accumulation, ran about 150 CPU-seconds a step on one thread: 12 steps in 30 minutes); no validation
    during training (the scores measure the same, once)."""
    return [f"max_steps={steps}", "eval_steps=0", "save_steps=0", "sample_steps=0",
            f"block.stage_steps={max(1, steps // 5)}", "train.batch_size=1", "train.gradient_accumulation_steps=1"]


CAUSAL, AR = ["block.clean_attention=causal"], ["objective.ar_loss_weight=0.5"]
DISTILL = ["objective.distill_weight=0.5"]
ARKL = CAUSAL + AR + ["objective.ar_target=parent"] + DISTILL  # the AR term as KL to the parent, + distillation
ARKL2 = CAUSAL + ["objective.ar_loss_weight=2", "objective.ar_target=parent"] + DISTILL  # the same at λ = 2


def arkl_mu1(weight: int, lr: str = "7.5e-4", seed: int = 0) -> list[str]:
    """The AR term as KL to the parent at λ = `weight`, distillation μ = 1, at `lr`; `seed`, where not 0, is
    train.seed (the data order, every mask draw and any initialisation): a second run of the same row."""
    return CAUSAL + [f"objective.ar_loss_weight={weight}", "objective.ar_target=parent", "objective.distill_weight=1.0",
                     f"train.lr={lr}"] + ([f"train.seed={seed}"] if seed else [])


ROWS = {
    "base": ("no options, run (g): lr 3e-3", []),
    "causal": ("token-causal clean stream", CAUSAL),
    "ar": ("AR loss λ = 0.5 (causal clean stream)", CAUSAL + AR),
    "pos": ("position masking c = 1", ["objective.position_masking=1"]),
    "distill": ("distillation μ = 0.5", DISTILL),
    "ar_distill": ("AR loss + distillation", CAUSAL + AR + DISTILL),
    "all": ("AR loss + distillation + position masking", CAUSAL + AR + DISTILL + ["objective.position_masking=1"]),
    "ar_half": ("AR loss, lr 1.5e-3", CAUSAL + AR + ["train.lr=1.5e-3"]),
    "ar_distill_half": ("AR loss + distillation, lr 1.5e-3", CAUSAL + AR + DISTILL + ["train.lr=1.5e-3"]),
    "distill_half": ("distillation, lr 1.5e-3", DISTILL + ["train.lr=1.5e-3"]),
    "ar_distill1_half": ("AR loss + distillation μ = 1, lr 1.5e-3",
                         CAUSAL + AR + ["objective.distill_weight=1.0", "train.lr=1.5e-3"]),
    "arkl_distill_half": ("AR KL to the parent + distillation, lr 1.5e-3", ARKL + ["train.lr=1.5e-3"]),
    "arkl_distill": ("AR KL to the parent + distillation", ARKL),
    "arkl2_distill_half": ("AR KL to the parent λ = 2 + distillation, lr 1.5e-3",
                           ARKL2 + ["train.lr=1.5e-3"]),
    "arkl2_distill_quarter": ("AR KL to the parent λ = 2 + distillation, lr 7.5e-4",
                              ARKL2 + ["train.lr=7.5e-4"]),
    "arkl2_distill_eighth": ("AR KL to the parent λ = 2 + distillation, lr 3.75e-4",
                             ARKL2 + ["train.lr=3.75e-4"]),
    "arkl2_distill_pos_quarter": ("AR KL to the parent λ = 2 + distillation + position masking, lr 7.5e-4",
                                  ARKL2 + ["objective.position_masking=1", "train.lr=7.5e-4"]),
    "arkl2_distill_comp_quarter": ("AR KL to the parent λ = 2 + distillation + complementary masks, lr 7.5e-4",
                                   ARKL2 + ["objective.complementary=true", "train.lr=7.5e-4"]),
    "arkl2_distill1_quarter": ("AR KL to the parent λ = 2 + distillation μ = 1, lr 7.5e-4", arkl_mu1(2)),
    "arkl4_distill1_quarter": ("AR KL to the parent λ = 4 + distillation μ = 1, lr 7.5e-4", arkl_mu1(4)),
    "arkl8_distill1_quarter": ("AR KL to the parent λ = 8 + distillation μ = 1, lr 7.5e-4", arkl_mu1(8)),
    "arkl8_distill1_eighth": ("AR KL to the parent λ = 8 + distillation μ = 1, lr 3.75e-4", arkl_mu1(8, "3.75e-4")),
    "arkl8_distill1_quarter_seed1": ("AR KL to the parent λ = 8 + distillation μ = 1, lr 7.5e-4, seed 1",
                                     arkl_mu1(8, seed=1)),
    "arkl4_distill1_quarter_seed1": ("AR KL to the parent λ = 4 + distillation μ = 1, lr 7.5e-4, seed 1",
                                     arkl_mu1(4, seed=1)),
    "arkl_distill_quarter": ("AR KL to the parent + distillation, lr 7.5e-4", ARKL + ["train.lr=7.5e-4"]),
    "all_half": ("AR loss + distillation + position masking, lr 1.5e-3",
                 CAUSAL + AR + DISTILL + ["objective.position_masking=1", "train.lr=1.5e-3"]),
}


@dataclass
class Setup:
    """One parent: what trains it, which rows, and the validation rows scored (`sequences` × `seq_length`)."""
    label: str
    source: Path
    recipe: Path
    overrides: object  # steps -> the run's overrides
    rows: dict
    seq_length: int
    sequences: int
    batch_size: int
    training: str  # the table's words for the recipe and batch
    elbo_draws: int = 16  # per validation sequence
    packing: str = "BOS before each paragraph"  # what `pack` does with this parent's tokenizer
    separator: str | None = None  # data.separator: training and scoring pack with it

    def title(self, steps: int) -> str:
        """One RESULTS.md section per budget and packing: a 1200-step rerun keeps the 300-step table."""
        return (f"# Keeping the parent's knowledge: ablation, {self.label} block 4, {steps} steps"
                + (f", {self.separator} between documents" if self.separator else "")
                + " (benchmarks/retention_ablation.py)")


SETUPS = {
    "stories": Setup("stories260K", SHARED / "models" / "stories260K", RECIPES / "stories260k.yaml", run_g, ROWS, 128,
                     64, 64, "recipes/adaptation/stories260k.yaml with run (g)'s overrides; batch 16 × 128 tokens, "
                     "lr 3e-3 cosine"),
    "smollm2": Setup(
        "SmolLM2-135M-Instruct LoRA", SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf",
        RECIPES / "smollm2-135m-block-lora.yaml", smollm2_steps,
        {"base": ("today's recipe: lr 1e-3", []), "ar_distill": ROWS["ar_distill"],
         "ar_distill_half": ("AR loss + distillation, lr 5e-4", CAUSAL + AR + DISTILL + ["train.lr=5e-4"]),
         "arkl2_distill": ("AR KL to the parent λ = 2 + distillation",
                           ARKL2)},
        256, 16, 8, "recipes/adaptation/smollm2-135m-block-lora.yaml (LoRA r 16 on all linear layers and the [MASK] "
        "row; the distillation teacher is the model with its adapter off), batch 1 × 256 tokens (its earlier 4 × 2 "
        "accumulation took about 150 CPU-seconds a step on one thread), complementary masks (two rows per "
        "sequence), lr 1e-3 cosine", elbo_draws=8, packing="EOS after each paragraph"),
}


def train(setup: Setup, name: str, out: Path, steps: int):
    import adapt
    from adapt.config import load_config

    overrides = [f"output_dir={out / name}", f"model.path={setup.source}", f"data.train={VALID.parent / 'train.txt'}",
                 f"data.validation={VALID}", *setup.overrides(steps), *setup.rows[name][1],
                 *([f"data.separator={setup.separator}"] if setup.separator else [])]
    start, cpu = time.perf_counter(), time.process_time()
    adapt.train(load_config(str(setup.recipe), overrides))
    (out / name / "timing.json").write_text(json.dumps({"wall_s": time.perf_counter() - start,
                                                        "cpu_s": time.process_time() - cpu}))


def lm_eval_scores(model: str, backend: str, args: str, work: Path, mc_samples: int, batch_size: int = 64) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import adapt.evaluation.lm_eval_backend  # noqa: F401 (registers --model dlm-adapt)

    manager = TaskManager(include_path=str(work), include_defaults=False)
    extra = f",mc_samples={mc_samples},seed=0" if backend == "dlm-adapt" else ",device=cpu"
    r = lm_eval.simple_evaluate(model=backend, model_args=f"pretrained={model}{extra}{args}",
                                tasks=["stories_cloze", "stories_next"], task_manager=manager, batch_size=batch_size,
                                log_samples=False)["results"]
    return {"cloze_acc": r["stories_cloze"]["acc,none"], "next_acc": r["stories_next"]["acc,none"],
            "next_acc_norm": r["stories_next"]["acc_norm,none"]}


def _scoring(setup: Setup, path: Path):
    """(model, parent, validation sequences, separator id) for a trained row."""
    import adapt
    from adapt.config import DataConfig
    from adapt.training.data import document_separator, load_documents, pack
    from adapt.sources import load_causal

    model, tok = adapt.load(str(path))
    sequences = pack(load_documents(str(VALID), DataConfig()), tok, setup.seq_length, "validation",
                     max_rows=setup.sequences, separator=setup.separator)
    return model, load_causal(setup.source).model, sequences, document_separator(tok, setup.separator)[1]


def kept(setup: Setup, path: Path) -> dict:
    """`adapt.training.forgetting` alone: what a row scored before `within_documents` existed gains it."""
    from adapt.training.forgetting import forgetting

    model, parent, sequences, separator = _scoring(setup, path)
    return forgetting(model, sequences, batch_size=setup.batch_size, seed=0, parent=parent, separator=separator)


def row_scores(setup: Setup, run: Path, work: Path, a) -> dict | None:
    """A row's scores, cached in RUN/ablation.json: scored once its final exists, and completed where a cached
    score predates lm-eval or the within-documents figures (when RUN/final is still there). None: not trained."""
    cached, final = run / "ablation.json", run / "final"
    trained = (final / "config.json").exists()
    scores = json.loads(cached.read_text()) if cached.exists() else None
    if scores is None:
        if not trained:
            return None
        scores = score(setup, final, work, a.mc_samples, not a.no_lm_eval)
    elif not a.no_lm_eval and "cloze_acc" not in scores:
        scores = {**scores, **model_lm_eval(final, work, a.mc_samples, setup.batch_size)}
    if trained and "block_start_change_stderr" not in scores.get("within_documents", {}):
        scores = {**scores, **kept(setup, final)}
    cached.write_text(json.dumps(scores, indent=1))
    return scores


def score(setup: Setup, path: Path, work: Path, mc_samples: int, lm_eval: bool = True) -> dict:
    from adapt.training.forgetting import forgetting
    from adapt.training.likelihood import diffusion_elbo

    model, parent, sequences, separator = _scoring(setup, path)
    b = setup.batch_size
    start = time.process_time()
    elbo = diffusion_elbo(model, sequences, mc_samples=setup.elbo_draws, batch_size=b, seed=0)
    scores = {"elbo": elbo["elbo_nats_per_token"], "elbo_stderr": elbo["stderr"],
              **forgetting(model, sequences, batch_size=b, seed=0, parent=parent, separator=separator),
              "score_cpu_s": time.process_time() - start}
    return {**scores, **(model_lm_eval(path, work, mc_samples, b) if lm_eval else {})}


def model_lm_eval(path: Path, work: Path, mc_samples: int, batch_size: int) -> dict:
    start = time.process_time()
    scores = lm_eval_scores(str(path), "dlm-adapt", "", work, mc_samples, batch_size)
    return {**scores, "lm_eval_cpu_s": time.process_time() - start}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=SETUPS, default="stories", help="the parent and its recipe (see above)")
    p.add_argument("--rows", help="comma-separated rows (default: all of --model's)")
    p.add_argument("--out-dir", help="default: runs/retention (stories), runs/retention-smollm2")
    p.add_argument("--train", action="store_true", help="train the rows whose OUT/NAME/final is missing")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps of every run (run (g): 1200)")
    p.add_argument("--paragraphs", type=int, default=100, help="lm-eval documents per task")
    p.add_argument("--mc-samples", type=int, default=4, help="ELBO draws per lm-eval request")
    p.add_argument("--no-lm-eval", action="store_true",
                   help="score rows not yet scored without lm-eval (a later run without it adds lm-eval)")
    p.add_argument("--separator", help="data.separator of training and scoring (default: the tokenizer's marks); "
                                        "its own RESULTS.md section")
    p.add_argument("--write", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    a = p.parse_args()
    torch.set_num_threads(1)
    setup = SETUPS[a.model]
    if a.separator:
        setup = dataclasses.replace(setup, separator=a.separator, packing=f"{a.separator} after each paragraph")
    out = Path(a.out_dir or HERE.parent / "runs" / ("retention" if a.model == "stories" else f"retention-{a.model}"))
    rows = [r for r in (a.rows or ",".join(setup.rows)).split(",") if r]
    if unknown := [r for r in rows if r not in setup.rows]:
        p.error(f"unknown rows for --model {a.model}: {','.join(unknown)} (known: {','.join(setup.rows)})")
    from lm_eval_stories import build_tasks

    work = Path(tempfile.mkdtemp(prefix="retention-"))
    build_tasks(work, VALID, a.paragraphs)
    results = {}
    for name in rows:
        if a.train and not (out / name / "final" / "config.json").exists():
            train(setup, name, out, a.steps)
        if (scores := row_scores(setup, out / name, work, a)) is not None:
            results[name] = scores
            print(name, json.dumps(scores), flush=True)
    if stale := [name for name, r in results.items() if "block_start_change_stderr" not in r.get("within_documents", {})]:
        p.error(f"rows {','.join(stale)} were scored before the within-documents figures and their OUTPUT/final is "
                "gone: train them again (--train, after removing their directories) or leave them out of --rows")
    parent_cache = out / "parent.json"
    if not parent_cache.exists():
        gguf = setup.source.suffix == ".gguf"  # lm-eval's hf backend takes a GGUF file as directory + gguf_file
        start = time.process_time()
        scores = lm_eval_scores(str(setup.source.parent if gguf else setup.source), "hf",
                                f",gguf_file={setup.source.name}" if gguf else "", work, a.mc_samples, setup.batch_size)
        parent_cache.write_text(json.dumps({**scores, "lm_eval_cpu_s": time.process_time() - start}))
    parent = json.loads(parent_cache.read_text())
    section = table(setup, results, parent, out, a)
    print(section)
    if a.write:
        from results_md import write_section

        write_section(HERE / "RESULTS.md", setup.title(a.steps), section)


def lm(r: dict, key: str) -> str:
    return f"{r[key]:.2f}" if key in r else "not measured"


def table(setup: Setup, results: dict, parent: dict, out: Path, a) -> str:
    first = next(iter(results.values()))
    ar = first["parent_nll"]
    model = "" if a.model == "stories" else f"--model {a.model} "
    lines = [setup.title(a.steps), "", f"{time.strftime('%Y-%m-%d')}, {os.uname().machine} CPU, torch "
             f"{torch.__version__}, one thread per run, 2 cores shared with other agents' jobs (wall times are not "
             f"comparable between rows; CPU minutes are). Training: {setup.training}, at {a.steps} steps "
             f"(`{' '.join(setup.overrides(a.steps))}`) plus each row's. Validation: the first {setup.sequences} "
             f"sequences of {setup.seq_length} tokens of valid.txt, packed as training packs "
             f"(`adapt.training.data.pack`: {setup.packing}; {first['tokens']} scored tokens, "
             f"{first['block_start_tokens']} of them block starts; block ELBO: {setup.elbo_draws} draws per sequence, "
             f"seed 0; within documents, without the separators and the token after each: "
             f"{first['within_documents']['tokens']} tokens, {first['within_documents']['block_start_tokens']} block "
             f"starts). AR parent: NLL **{ar:.3f}**, block-start NLL {first['parent_block_start_nll']:.3f}; within "
             f"documents {first['within_documents']['parent_nll']:.3f} and "
             f"{first['within_documents']['parent_block_start_nll']:.3f}; "
             f"cloze {parent['cloze_acc']:.2f}, next-sentence {parent['next_acc']:.2f} (acc_norm "
             f"{parent['next_acc_norm']:.2f}). lm-eval: {a.paragraphs} paragraphs per task, {a.mc_samples} ELBO "
             f"draws per request. Command: `python benchmarks/retention_ablation.py {model}--train --steps {a.steps} "
             + (f"--separator '{a.separator}' " if a.separator else "")
             + f"--paragraphs {a.paragraphs} --mc-samples {a.mc_samples} --rows {','.join(results)} --write`.", "",
             "| row | overrides | block ELBO ÷ AR NLL | block-start NLL − parent's (within documents) | AR-mode NLL "
             "(within documents) | l = 1 / 2 / 3 / 4 masked (CE per masked token) | cloze acc | "
             "next-sentence acc (norm) | CPU min |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for name, r in results.items():
        timing = out / name / "timing.json"
        cpu = f"{json.loads(timing.read_text())['cpu_s'] / 60:.1f}" if timing.exists() else "–"
        per_l = " / ".join(f"{v:.2f}" for v in r["masked_per_block"].values())
        over = " ".join(f"`{o}`" for o in setup.rows[name][1]) or "–"
        inside = r["within_documents"]
        mode = (f"{r['ar_nll']:.3f} ({inside['ar_nll']:.3f})"
                + ("" if r["clean_attention"] == "causal" else " (no AR mode trained)"))
        lines.append(f"| {setup.rows[name][0]} | {over} | {r['elbo'] / ar:.3f} "
                     f"({r['elbo']:.3f} ± {r['elbo_stderr']:.3f}) "
                     f"| {r['block_start_change']:+.3f} ({inside['block_start_change']:+.3f} ± "
                     f"{inside['block_start_change_stderr']:.3f}) | {mode} | {per_l} | {lm(r, 'cloze_acc')} | "
                     f"{lm(r, 'next_acc')} ({lm(r, 'next_acc_norm')}) | {cpu} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
