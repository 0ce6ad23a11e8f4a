"""Diffusion training step vs a plain causal-LM step on the same model and batch.

Throughput: both steps run interleaved in one process (forward + backward + AdamW step), medians over repeats;
prints tokens/s of the diffusion step ÷ the causal step (a) while annealing (mask ratio 0.5, a dense mask is
built every step) and (b) after annealing (ratio 1, no mask). Memory: each mode in a fresh subprocess, peak
RSS (CPU) or peak CUDA memory, ÷ the causal step's. Targets: >= 0.90 while annealing, >= 0.97 after, memory
<= 1.05x. A `bidirectional` plain-CE step is timed too: causal kernels skip the masked half of attention, so
part of the gap after annealing is the cost of full attention itself, not of the objective. A `block` step
(block diffusion, B = 32, the 2L layout: noised and clean text in one forward) is reported ÷ the causal step, ÷
the full-sequence diffusion step, and ÷ its physical limit `causal2L`: a causal step over the same 2L positions
(the same decoder FLOPs, the LM head on L of them, no mask), so the part of the gap that is the layout (2L
positions) and the part that is the mask are apart. `--flex` adds annealing, after and block with
`attn_implementation="flex_attention"` (same weights; BlockMasks instead of dense masks): on CUDA only, since
torch has no flex backward on CPU (the column then says so).

    python benchmarks/train_step.py [--device cpu|cuda] [--length 512] [--batch 4] [--repeats 7] [--flex]
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


def build(device, dtype, impl="sdpa"):
    from transformers import LlamaConfig

    from adapt.model import MaskedDiffusionConfig, MaskedDiffusionLM

    base = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = MaskedDiffusionLM(MaskedDiffusionConfig(text_config=base.to_dict(), mask_token_id=8191))
    model.set_attn_implementation(impl)
    return model.to(device=device, dtype=dtype).train()


def make_step(model, mode, batch, length, device):
    from adapt.training.annealing import annealed_inputs
    from adapt.model.block_masked_diffusion import canvas_logits, two_l_layout
    from adapt.training.objective import ObjectiveConfig, diffusion_loss, noised_batch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x0 = torch.randint(0, 8000, (batch, length), device=device)
    cfg, gen = ObjectiveConfig(), torch.Generator().manual_seed(0)
    mode = mode.removesuffix("-flex")
    ratio = {"annealing": 0.5, "after": 1.0}.get(mode)
    x2 = torch.cat([x0, x0], 1)
    keep = torch.arange(length, 2 * length, device=device)

    def step():
        if mode in ("causal", "bidirectional"):  # plain next-token CE; `bidirectional` isolates attention cost
            logits = model(x0, is_causal=mode == "causal").logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x0[:, 1:].flatten())
        elif mode == "causal2L":  # the 2L layout's limit: 2L positions through the decoder, L logits, no mask
            logits = model(x2, is_causal=True, logits_to_keep=keep).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x0[:, 1:].flatten())
        elif mode == "block":  # block diffusion: noised + clean text in one 2L forward (adapt/blocks.py)
            x_t, x, masked, maskable, t = noised_batch(x0, torch.ones_like(x0, dtype=torch.bool), cfg, 8191, True, gen,
                                                       block_size=BLOCK)
            inputs, index = two_l_layout(model, x_t, x, block_size=BLOCK)
            logits = canvas_logits(model(**inputs).logits, index)
            loss = diffusion_loss(logits, x, masked, maskable, t, cfg, shift=True, mask_token_id=8191)
        else:
            x_t, x, masked, maskable, t = noised_batch(x0, torch.ones_like(x0, dtype=torch.bool), cfg, 8191, True, gen)
            attention = annealed_inputs(model, torch.ones_like(x_t), ratio, gen)
            logits = model(x_t, **attention, position_ids=torch.arange(length, device=device)[None]).logits
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


def _ratio(a, b):
    return f"{a / b:.3f}" if a and b else "n/a"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--flex", action="store_true", help="also time annealing, after and block with flex attention")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.memory_child:
        model = build(args.device, dtype, "flex_attention" if args.memory_child.endswith("-flex") else "sdpa")
        step = make_step(model, args.memory_child, args.batch, args.length, args.device)
        for _ in range(3):
            step()
        print(json.dumps({"peak": peak_memory(args.device)}))
        return
    models = {"sdpa": build(args.device, dtype)}
    modes = ["causal", "bidirectional", "causal2L", "annealing", "after", "block"]
    flex_note = None
    if args.flex and args.device == "cpu":
        flex_note = "flex: n/a on cpu (torch has no flex-attention backward there; it trains on CUDA)"
    elif args.flex:
        models["flex"] = build(args.device, dtype, "flex_attention")
        modes += ["annealing-flex", "after-flex", "block-flex"]
    steps = {m: make_step(models["flex" if m.endswith("-flex") else "sdpa"], m, args.batch, args.length, args.device)
             for m in modes}
    for s in steps.values():
        s()  # warm up (flex: compiles its kernels and BlockMask builders here)
    times = {m: [] for m in steps}
    for _ in range(args.repeats):
        for mode, s in steps.items():
            t0 = time.perf_counter()
            s()
            times[mode].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    peaks = {}
    for mode in modes:
        if mode == "bidirectional":
            continue
        out = subprocess.run([sys.executable, __file__, "--device", args.device, "--length", str(args.length),
                              "--batch", str(args.batch), "--memory-child", mode], capture_output=True, text=True,
                             check=True)
        peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    tokens = args.batch * args.length
    print(f"device {args.device}, batch {args.batch} x length {args.length}, median of {args.repeats}")
    print(f"  {'step':15s} {'ms/step':>9s} {'tokens/s':>9s} {'÷ causal':>9s} {'memory ÷ causal':>16s}")
    for mode in steps:
        print(f"  {mode:15s} {med[mode] * 1000:9.1f} {tokens / med[mode]:9.0f} {med['causal'] / med[mode]:9.3f} "
              f"{_ratio(peaks.get(mode), peaks['causal']):>16s}")
    for impl in ("", "-flex") if "block-flex" in steps else ("",):
        name = impl.removeprefix("-") or "sdpa"
        a, b = f"annealing{impl}", f"block{impl}"
        print(f"[{name}] annealing (ratio 0.5): tokens/s {med['causal'] / med[a]:.3f} x causal (target >= 0.90), "
              f"memory {_ratio(peaks[a], peaks['causal'])} x (target <= 1.05)")
        print(f"[{name}] after annealing: tokens/s {med['causal'] / med[f'after{impl}']:.3f} x causal (target >= "
              f"0.97), memory {_ratio(peaks[f'after{impl}'], peaks['causal'])} x (target <= 1.05)")
        print(f"[{name}] block (B={BLOCK}, 2L): tokens/s {med['causal'] / med[b]:.3f} x causal, "
              f"{med['causal2L'] / med[b]:.3f} x its limit causal2L (target >= 0.90); memory "
              f"{_ratio(peaks[b], peaks['causal'])} x causal, {_ratio(peaks[b], peaks['causal2L'])} x causal2L "
              f"(target <= 1.10)")
    print(f"causal2L (2L positions, causal, no mask) tokens/s ÷ causal: {med['causal'] / med['causal2L']:.3f}: the "
          f"2L layout's ceiling")
    print(f"objective overhead after annealing (vs plain CE, same bidirectional attention): "
          f"{med['bidirectional'] / med['after']:.3f}")
    if flex_note:
        print(flex_note)


if __name__ == "__main__":
    main()
