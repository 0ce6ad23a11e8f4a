"""Load on `dlm-adapt serve`: N concurrent clients (the official `openai` client, one thread each) send a fixed
number of completion requests to a real server (`dlm-adapt serve`, a subprocess on 127.0.0.1); against the same workload
decoded in this process one request at a time through `adapt.generate` (one `diffusion_generate` call per prompt),
the way an application without a server decodes.

Prints and writes to benchmarks/RESULTS.md: requests/s, generated tokens/s, p50/p99 latency, failed requests, the
server's batches, and the throughput ratio server ÷ sequential; quality next to speed: the share of requests whose
text is the sequential (greedy) text. Rounds alternate sequential and server; medians of the rounds.

    python benchmarks/serve_load.py [--model DIR] [--clients 8] [--requests 32] [--max-tokens 32] [--rounds 3]
A missing --model is converted from ../shared/models/stories260K with --block-size 4 (untrained: the text is
nonsense, the timings are the point; pass an adapted checkpoint for real text).
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from results_md import write_section  # benchmarks/ is the script's directory

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def prompts(count: int) -> list[str]:
    lines = [ln for ln in (SHARED / "data" / "tinystories" / "valid.txt").read_text().splitlines() if ln.strip()]
    return [" ".join(ln.split()[:8]) for ln in lines[:count]]


def sequential(model, tokenizer, texts, max_tokens) -> tuple[float, list[str], int]:
    import adapt

    start, out, tokens = time.perf_counter(), [], 0
    for text in texts:
        r = adapt.generate(model, [text], tokenizer=tokenizer, max_new_tokens=max_tokens)[0]
        out.append(r["text"])
        tokens += len(r["tokens"])
    return time.perf_counter() - start, out, tokens


def load(port, name, texts, clients, max_tokens) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

    def one(text):
        t = time.perf_counter()
        try:
            r = client.completions.create(model=name, prompt=text, max_tokens=max_tokens)
            return time.perf_counter() - t, r.choices[0].text, r.usage.completion_tokens
        except Exception as e:  # counted, not hidden
            return time.perf_counter() - t, e, 0

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, texts))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return dict(wall=wall, texts=[r[1] for r in results], tokens=sum(r[2] for r in results),
                failed=sum(isinstance(r[1], Exception) for r in results),
                p50=statistics.median(latencies), p99=latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))])


def start_server(model, port, max_batch_size, threads):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    process = subprocess.Popen([sys.executable, "-m", "adapt", "serve", str(model), "--port", str(port),
                                "--max-batch-size", str(max_batch_size), "--log-level", "warning"], env=env)
    deadline = time.monotonic() + 120
    while True:
        try:
            return process, json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health"))
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.3)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads, here and in the server")
    p.add_argument("--note", default="", help="a line about the machine (e.g. shared with other jobs)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import adapt

    model_dir = Path(a.model) if a.model else Path(tempfile.mkdtemp()) / "stories260K-block4"
    if not model_dir.exists():
        adapt.convert(SHARED / "models" / "stories260K", model_dir, block_size=4)
    model, tokenizer = adapt.load(model_dir)
    texts = (prompts(a.requests) * a.requests)[: a.requests]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server, health = start_server(model_dir, port, a.max_batch_size, a.threads)
    rounds = []
    try:
        load(port, health["model"], texts[:2], 2, a.max_tokens)  # warm-up
        for _ in range(a.rounds):
            seq_wall, seq_texts, seq_tokens = sequential(model, tokenizer, texts, a.max_tokens)
            served = load(port, health["model"], texts, a.clients, a.max_tokens)
            served.update(seq_wall=seq_wall, seq_tokens=seq_tokens,
                          same=sum(t == s for t, s in zip(served["texts"], seq_texts)) / len(texts))
            rounds.append(served)
            print(f"round: sequential {seq_wall:.2f} s, server {served['wall']:.2f} s, "
                  f"failed {served['failed']}, same text {served['same']:.0%}", flush=True)
        stats = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health"))["batching"]
    finally:
        server.terminate()
        code = server.wait(60)
    med = {k: statistics.median(r[k] for r in rounds) for k in ("wall", "seq_wall", "p50", "p99", "tokens",
                                                                "seq_tokens", "same")}
    n = a.requests
    rows = [("sequential `adapt.generate`, one request at a time", n / med["seq_wall"], med["seq_tokens"] /
             med["seq_wall"], med["seq_wall"] / n, None, 0, "100% (reference)"),
            (f"`dlm-adapt serve`, {a.clients} concurrent clients", n / med["wall"], med["tokens"] / med["wall"],
             med["p50"], med["p99"], sum(r["failed"] for r in rounds), f"{med['same']:.0%}")]
    ratio = med["seq_wall"] / med["wall"]
    lines = [f"# Serving under load (benchmarks/serve_load.py)", "",
             f"{datetime.date.today()}, {platform.machine()} CPU, torch {torch.__version__}, {a.threads} threads "
             f"(server and sequential each). {a.note}".rstrip(), "",
             f"Model: `{model_dir.name}` "
             f"({a.model or 'stories260K converted with --block-size 4, untrained'}). "
             f"{n} completion requests (TinyStories validation openings, 8 words), max_tokens {a.max_tokens}, greedy, "
             f"the checkpoint's decoding settings; server --max-batch-size {a.max_batch_size}. Medians of "
             f"{a.rounds} rounds, sequential and server alternating. Server exit status after SIGTERM: {code}.", "",
             "| workload | requests/s | tokens/s | latency p50 (s) | latency p99 (s) | failed "
             "| same text as sequential |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, rps, tps, p50, p99, failed, same in rows:
        lines.append(f"| {name} | {rps:.2f} | {tps:.1f} | {p50:.3f} | {'' if p99 is None else f'{p99:.3f}'} | "
                     f"{failed} | {same} |")
    lines += ["", f"Throughput server ÷ sequential: **{ratio:.2f}×** (target ≥ 3× with 8 clients; "
              f"{'met' if ratio >= 3 else 'not met'}). The server ran {stats['batches']} batches for "
              f"{stats['requests_served']} requests (largest {stats['max_batch_size_seen']}); sequential latency is "
              "the time per request.", ""]
    section = "\n".join(lines)
    print(section)
    write_section(Path(a.out), lines[0], section)


if __name__ == "__main__":
    main()
