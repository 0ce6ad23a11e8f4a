"""Diffusion training step vs a plain causal-LM step on the same model and batch.

Throughput: both steps run interleaved in one process (forward + backward + AdamW step), medians over repeats;
prints tokens/s of the diffusion step ÷ the causal step (a) while annealing (mask ratio 0.5, a dense mask is
built every step) and (b) after annealing (ratio 1, no mask). Memory: each mode in a fresh subprocess, peak
RSS (CPU) or peak CUDA memory, ÷ the causal step's. Targets: >= 0.90 while annealing, >= 0.97 after, memory
<= 1.05x. A `bidirectional` plain-CE step is timed too: causal kernels skip the masked half of attention, so
part of the gap after annealing is the cost of full attention itself, not of the objective. A `block` step
(block diffusion, B = 32, the 2L layout: noised and clean text in one forward) is reported ÷ the causal step and
÷ the full-sequence diffusion step; it processes 2L positions per L text tokens, so about 0.5 is expected.

    python benchmarks/train_step.py [--device cpu|cuda] [--length 512] [--batch 4] [--repeats 7]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


BLOCK = 32  # Fast-dLLM v2's block size


def build(device, dtype):
    from transformers import LlamaConfig

    from adapt.model import MaskedDiffusionConfig, MaskedDiffusionLM

    base = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = MaskedDiffusionLM(MaskedDiffusionConfig(text_config=base.to_dict(), mask_token_id=8191))
    model.set_attn_implementation("sdpa")
    return model.to(device=device, dtype=dtype).train()


def make_step(model, mode, batch, length, device):
    from adapt.training.annealing import annealed_attention_mask
    from adapt.model.block_masked_diffusion import canvas_logits, two_l_layout
    from adapt.training.objective import ObjectiveConfig, diffusion_loss, noised_batch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x0 = torch.randint(0, 8000, (batch, length), device=device)
    cfg, gen = ObjectiveConfig(), torch.Generator().manual_seed(0)
    ratio = {"annealing": 0.5, "after": 1.0}.get(mode)

    def step():
        if mode in ("causal", "bidirectional"):  # plain next-token CE; `bidirectional` isolates attention cost
            logits = model(x0, is_causal=mode == "causal").logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x0[:, 1:].flatten())
        elif mode == "block":  # block diffusion: noised + clean text in one 2L forward (adapt/blocks.py)
            x_t, x, masked, maskable, t = noised_batch(x0, torch.ones_like(x0, dtype=torch.bool), cfg, 8191, True, gen,
                                                       block_size=BLOCK)
            inputs, index = two_l_layout(model, x_t, x, block_size=BLOCK)
            logits = canvas_logits(model(**inputs).logits, index)
            loss = diffusion_loss(logits, x, masked, maskable, t, cfg, shift=True, mask_token_id=8191)
        else:
            x_t, x, masked, maskable, t = noised_batch(x0, torch.ones_like(x0, dtype=torch.bool), cfg, 8191, True, gen)
            attention = annealed_attention_mask(model, torch.ones_like(x_t), ratio, gen)
            logits = model(x_t, attention_mask=attention, position_ids=torch.arange(length, device=device)[None]).logits
            loss = diffusion_loss(logits, x, masked, maskable, t, cfg, shift=True, mask_token_id=8191)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def peak_memory(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build(args.device, dtype)
    if args.memory_child:
        step = make_step(model, args.memory_child, args.batch, args.length, args.device)
        for _ in range(3):
            step()
        print(json.dumps({"peak": peak_memory(args.device)}))
        return
    steps = {m: make_step(model, m, args.batch, args.length, args.device)
             for m in ("causal", "bidirectional", "annealing", "after", "block")}
    for s in steps.values():
        s()  # warm up
    times = {m: [] for m in steps}
    for _ in range(args.repeats):
        for mode, s in steps.items():
            t0 = time.perf_counter()
            s()
            times[mode].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    tokens = args.batch * args.length
    print(f"device {args.device}, batch {args.batch} x length {args.length}, median of {args.repeats}")
    for mode in steps:
        print(f"  {mode:13s} {med[mode] * 1000:8.1f} ms/step  {tokens / med[mode]:9.0f} tokens/s")
    print(f"throughput ratio while annealing: {med['causal'] / med['annealing']:.3f} (target >= 0.90)")
    print(f"throughput ratio after annealing: {med['causal'] / med['after']:.3f} (target >= 0.97)")
    print(f"objective overhead after annealing (vs plain CE, same bidirectional attention): "
          f"{med['bidirectional'] / med['after']:.3f}")
    print(f"block diffusion (B={BLOCK}, 2L layout) tokens/s ÷ causal: {med['causal'] / med['block']:.3f}, "
          f"÷ full-sequence diffusion: {med['after'] / med['block']:.3f}")
    peaks = {}
    for mode in ("causal", "annealing", "after", "block"):
        out = subprocess.run([sys.executable, __file__, "--device", args.device, "--length", str(args.length),
                              "--batch", str(args.batch), "--memory-child", mode], capture_output=True, text=True,
                             check=True)
        peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    for mode in ("annealing", "after"):
        print(f"peak memory ratio {mode}: {peaks[mode] / peaks['causal']:.3f} (target <= 1.05)")
    print(f"peak memory ratio block: {peaks['block'] / peaks['causal']:.3f} ÷ causal, "
          f"{peaks['block'] / peaks['after']:.3f} ÷ full-sequence diffusion")


if __name__ == "__main__":
    main()
