"""Conversion cost vs a plain `from_pretrained` + `save_pretrained` of the same checkpoint.

Builds a randomly initialised ~110M-parameter LLaMA (fp32 safetensors, tokenizer as long as the vocabulary, so
the mask token forces the add+resize path), then runs each job in a fresh subprocess, alternating, N times.
Prints medians and the ratios: time(convert) / time(baseline), and peak RSS(convert) / checkpoint bytes.
Targets: time ratio <= 1.2, peak RSS <= 1.2 x checkpoint bytes.

    python benchmarks/convert.py [--repeats 3] [--workdir DIR]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
job, src, out = sys.argv[1:4]

def peak_rss():  # VmHWM belongs to this exec'd image; ru_maxrss would inherit the parent's peak across fork
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

import torch, transformers
if job == "convert":
    import adapt
base_rss = peak_rss()
t0 = time.perf_counter()
if job == "convert":
    adapt.convert(src, out, overwrite=True)
else:
    m = transformers.AutoModelForCausalLM.from_pretrained(src)
    m.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(out)
seconds = time.perf_counter() - t0
peak = peak_rss()
print(json.dumps({"seconds": seconds, "peak_rss": peak, "rss_after_imports": base_rss}))
"""


def build_source(path: Path):
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = 32000
    config = LlamaConfig(vocab_size=vocab, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<unk>")),
                                  unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dlm-bench-"))
    src = work / "src"
    if not (src / "model.safetensors").exists():
        build_source(src)
    ckpt_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    runs = {"baseline": [], "convert": []}
    for _ in range(args.repeats):
        for job in runs:
            proc = subprocess.run([sys.executable, "-c", CHILD, job, str(src), str(work / job)],
                                  capture_output=True, text=True, check=True)
            runs[job].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    med = {job: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for job, rs in runs.items()}
    mb = 1 << 20
    print(f"checkpoint: {ckpt_bytes / mb:.0f} MiB, {args.repeats} runs each, medians")
    for job, m in med.items():
        print(f"  {job:9s} {m['seconds']:6.2f} s   peak RSS {m['peak_rss'] / mb:6.0f} MiB "
              f"(after imports {m['rss_after_imports'] / mb:.0f} MiB)")
    print(f"time ratio convert/baseline: {med['convert']['seconds'] / med['baseline']['seconds']:.2f} (target <= 1.2)")
    print(f"peak RSS convert / checkpoint bytes: {med['convert']['peak_rss'] / ckpt_bytes:.2f} (target <= 1.2)")
    print(f"peak RSS above imports / checkpoint bytes: "
          f"{(med['convert']['peak_rss'] - med['convert']['rss_after_imports']) / ckpt_bytes:.2f}")
    print(f"peak RSS baseline / checkpoint bytes: {med['baseline']['peak_rss'] / ckpt_bytes:.2f}")


if __name__ == "__main__":
    main()
