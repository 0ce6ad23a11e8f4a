"""lm-evaluation-harness on TinyStories, offline: the AR parent (lm-eval's `hf` backend), its fresh conversion and
adapted checkpoints (`--model dlm-adapt`), scored on the same three tasks built from held-out stories.

- `stories_cloze` (LAMBADA-style): a paragraph up to its last word; acc = the last word is the greedy
  continuation (`is_greedy`), plus its perplexity.
- `stories_next` (multiple choice): the first sentences of a paragraph; choose the real next sentence among 4
  (the other 3 from other paragraphs); acc and acc_norm.
- `stories_ppl` (rolling loglikelihood): word perplexity and bits per byte of whole paragraphs.

    python benchmarks/lm_eval_stories.py --full runs/stories/final --block runs/block/final [--limit 100] [--write]

`--write` replaces this benchmark's section of benchmarks/RESULTS.md.
"""

import argparse
import json
import os
import random
import re
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
TITLE = "# lm-evaluation-harness on TinyStories (benchmarks/lm_eval_stories.py)"


def paragraphs(path: Path) -> list[str]:
    return [p.strip().replace("\n", " ") for p in path.read_text().split("\n\n") if len(p.split()) >= 30]


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def build_tasks(directory: Path, valid: Path, n: int, seed: int = 0):
    rng = random.Random(seed)
    docs = paragraphs(valid)
    rng.shuffle(docs)
    cloze, nxt, ppl = [], [], []
    pool = [s for d in docs[n * 3:] for s in sentences(d)[1:]]  # distractors from paragraphs not in the tasks
    for d in docs[:n]:
        words = d.rstrip(".!?\"'").split(" ")
        cloze.append({"context": " ".join(words[:-1]), "target": " " + words[-1]})
    for d in docs[n:2 * n]:
        s = sentences(d)
        if len(s) < 2:
            continue
        k = max(1, len(s) // 2)
        choices = [s[k]] + rng.sample(pool, 3)
        order = list(range(4))
        rng.shuffle(order)
        nxt.append({"context": " ".join(s[:k]), "choices": [choices[i] for i in order], "label": order.index(0)})
    ppl = [{"text": d} for d in docs[2 * n:3 * n]]

    def write(name, rows, body):
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (directory / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")

    write("stories_cloze", cloze, 'output_type: loglikelihood\ndoc_to_text: "{{context}}"\n'
          'doc_to_target: "{{target}}"\nmetric_list:\n  - metric: perplexity\n  - metric: acc\n')
    write("stories_next", nxt, 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
          'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\ntarget_delimiter: " "\n'
          'metric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    write("stories_ppl", ppl, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
          'metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n')


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parent", default=str(SHARED / "models" / "stories260K"))
    p.add_argument("--data", default=str(SHARED / "data" / "tinystories" / "valid.txt"))
    p.add_argument("--full", help="a full-sequence adapted checkpoint of the parent")
    p.add_argument("--block", help="a block-diffusion adapted checkpoint of the parent")
    p.add_argument("--limit", type=int, default=100, help="documents per task")
    p.add_argument("--mc-samples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--write", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    a = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    import lm_eval
    from lm_eval.tasks import TaskManager

    import adapt
    import adapt.evaluation.lm_eval_backend  # noqa: F401 (registers --model dlm-adapt)
    from results_md import write_section

    work = Path(tempfile.mkdtemp(prefix="lm_eval_stories-"))
    build_tasks(work, Path(a.data), a.limit)
    manager = TaskManager(include_path=str(work), include_defaults=False)
    converted = adapt.convert(a.parent, work / "converted")
    tasks = ["stories_cloze", "stories_next", "stories_ppl"]
    common = f"mc_samples={a.mc_samples},seed=0"
    runs = [("AR parent (lm-eval `hf`)", "hf", f"pretrained={a.parent},device=cpu"),
            ("converted, untrained, `is_causal=True`", "dlm-adapt", f"pretrained={converted},is_causal=True"),
            ("converted, untrained (ELBO)", "dlm-adapt", f"pretrained={converted},{common}")]
    if a.full:
        runs.append((f"adapted, full-sequence ({a.full})", "dlm-adapt", f"pretrained={a.full},{common}"))
    if a.block:
        runs.append((f"adapted, block diffusion ({a.block})", "dlm-adapt", f"pretrained={a.block},{common}"))
    rows = []
    for name, backend, args in runs:
        start = time.perf_counter()
        r = lm_eval.simple_evaluate(model=backend, model_args=args, tasks=tasks, task_manager=manager,
                                    batch_size=a.batch_size, log_samples=False)["results"]
        seconds = time.perf_counter() - start
        rows.append((name, r["stories_cloze"]["acc,none"], r["stories_cloze"]["perplexity,none"],
                     r["stories_next"]["acc,none"], r["stories_next"]["acc_norm,none"],
                     r["stories_ppl"]["word_perplexity,none"], r["stories_ppl"]["bits_per_byte,none"], seconds))
        print(rows[-1], flush=True)
    section = (f"{TITLE}\n\n{time.strftime('%Y-%m-%d')}, {os.uname().machine} CPU, torch {torch.__version__}, "
               f"lm-eval {lm_eval.__version__}, 2 threads. {a.limit} paragraphs of {Path(a.data).name} per task "
               f"(each task its own paragraphs), MC ELBO with {a.mc_samples} draws per request, seed 0, batch "
               f"{a.batch_size} rows. Diffusion likelihoods are ELBO bounds (log p ≥ −ELBO): their perplexities "
               "are upper bounds, and the cloze `acc` is `is_greedy` (the last word is the argmax when it alone is "
               f"masked). Command: `python benchmarks/lm_eval_stories.py --limit {a.limit}"
               + (f" --full {a.full}" if a.full else "") + (f" --block {a.block}" if a.block else "") + "`.\n\n"
               "| model | cloze acc | cloze ppl | next-sentence acc | acc_norm | word ppl | bits/byte | seconds |\n"
               "|---|---|---|---|---|---|---|---|\n"
               + "".join(f"| {n} | {c:.3f} | {cp:.1f} | {m:.3f} | {mn:.3f} | {w:.2f} | {b:.3f} | {s:.0f} |\n"
                         for n, c, cp, m, mn, w, b, s in rows))
    print(section)
    if a.write:
        write_section(HERE / "RESULTS.md", TITLE, section)


if __name__ == "__main__":
    main()
