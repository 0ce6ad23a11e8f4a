"""What a causal parent pays for the token that separates packed documents (`data.separator`): its NLL of the
validation text packed each way, split into the separator tokens, the token after each, and the rest. A separator
the parent never learned costs nats at every document boundary, and an adaptation trained on that packing learns
the format: its NLL ratio to the parent then flatters it by the difference. Pick the packing whose "rest" is lowest
and whose separator the parent predicts; compare adaptations only on text packed alike.

    python benchmarks/separator_cost.py --model smollm2 --separators '<|endoftext|>,<|im_start|>' --write
    python benchmarks/separator_cost.py --model stories --separators '</s>' --write

The tokenizer's own packing (BOS first where it adds one, else EOS after each document) is always the first row.
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
SHARED = HERE.parent.parent / "shared"
VALID = SHARED / "data" / "tinystories" / "valid.txt"
MODELS = {  # name: (source, sequence length, sequences): the retention ablation's validation rows
    "stories": (SHARED / "models" / "stories260K", 128, 64),
    "smollm2": (SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf", 256, 16),
}


def costs(model, tokenizer, documents, seq_length: int, rows: int, separator: str | None) -> dict:
    from adapt.training.data import document_separator, pack
    from adapt.training.forgetting import within_documents

    kind, mark = document_separator(tokenizer, separator)
    x = pack(documents, tokenizer, seq_length, "validation", max_rows=rows, separator=separator)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, x[:, 1:, None])[..., 0]
    at, after = x[:, 1:] == mark, x[:, :-1] == mark  # `after` counts a row that starts with the separator too
    rest = within_documents(x, mark)  # what `forgetting` scores within documents
    name = f"{tokenizer.convert_ids_to_tokens(mark)} {'before' if kind == 'bos' else 'after'} each document"
    return {"packing": name + ("" if separator else " (the tokenizer's own)"), "nll": nll.mean().item(),
            "separators": int(at.sum()), "at": nll[at].mean().item(), "after": nll[after].mean().item(),
            "rest": nll[rest].mean().item(), "tokens": nll.numel()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="smollm2")
    p.add_argument("--separators", default="", help="comma-separated special tokens to try beside the default")
    p.add_argument("--write", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    a = p.parse_args()
    torch.set_num_threads(1)
    from adapt.config import DataConfig
    from adapt.sources import load_causal
    from adapt.training.data import load_documents

    source, seq_length, rows = MODELS[a.model]
    loaded = load_causal(source)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    documents = load_documents(str(VALID), DataConfig())
    results = [costs(model, tokenizer, documents, seq_length, rows, s)
               for s in [None, *[s for s in a.separators.split(",") if s]]]
    title = f"# What the parent pays for the document separator, {source.name} (benchmarks/separator_cost.py)"
    lines = [title, "", f"{time.strftime('%Y-%m-%d')}, {os.uname().machine} CPU, torch {torch.__version__}. The "
             f"parent `{source.name}` scores the first {rows} sequences of {seq_length} tokens of valid.txt packed "
             "each way (paragraphs are documents), as benchmarks/retention_ablation.py scores them. Nats per token. "
             f"Command: `python benchmarks/separator_cost.py --model {a.model} --separators '{a.separators}' "
             "--write`.", "", "| packing | NLL | separators | at a separator | the token after | the rest |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['packing']} | {r['nll']:.3f} | {r['separators']} | {r['at']:.2f} | {r['after']:.2f} | "
              f"{r['rest']:.3f} |" for r in results]
    section = "\n".join(lines) + "\n"
    print(section)
    if a.write:
        sys.path.insert(0, str(HERE))
        from results_md import write_section

        write_section(HERE / "RESULTS.md", title, section)


if __name__ == "__main__":
    main()
