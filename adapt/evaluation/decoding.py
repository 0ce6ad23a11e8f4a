"""The decoding metrics of `dlm-adapt eval`: infilling (`infill`) and quality against the number of decoding passes
(`steps_sweep`, on the copying task `repeat_task`, and its plot), for a diffusion checkpoint through its own
`diffusion_generate` and for a causal LM greedily, on the packed sequences `harness.evaluate` hands over."""

import math
from pathlib import Path

import torch

from ..checkpoint import CAUSAL, is_diffusion_model
from ..config import SamplingOptions
from ..errors import AdaptError
from ..training.likelihood import model_device, nll_after

DIFFUSION = "diffusion"  # the other kind is checkpoint.CAUSAL, "causal"


# ------------------------------------------------------------------------------------------------ infill

@torch.no_grad()
def infill(model, sequences: torch.Tensor, *, span: int | None = None, examples: int = 16, batch_size: int = 16,
           ar_scorer=None, ar_name: str | None = None, kv_cache: str | None = None) -> dict:
    """Hide the middle `span` tokens of each sequence and fill them: a diffusion model with its `diffusion_generate`
    (prefix and suffix visible, one token per pass, in its generation config's order: most confident first unless
    it says otherwise; `kv_cache` as there), a causal LM greedily from the prefix alone (the baseline that cannot
    see the suffix). A block-diffusion checkpoint fills the span block by block, each hole seeing its own block on
    both sides and the blocks before it, not later ones. `token_accuracy`: filled tokens equal to the original.
    `ar_parent_nll`: the AR scorer's NLL per token of the span and everything after it, so a fill that does not
    lead into the suffix is penalised too; `reference_ar_parent_nll` is the same on the original text."""
    x = sequences[:examples]
    length = x.shape[1]
    span = span if span is not None else max(1, length // 4)
    if not 1 <= span <= length - 2:
        raise AdaptError(f"infill span must be between 1 and seq_length − 2 ({length - 2}), got {span}")
    start = (length - span) // 2
    device = model_device(model)
    filled = []
    diffusion = kind_of(model) == DIFFUSION
    for lo in range(0, x.shape[0], batch_size):
        rows = x[lo:lo + batch_size].to(device)
        if diffusion:
            holes = rows.clone()
            holes[:, start:start + span] = model.config.mask_token_id
            out = _sample(model, holes, max_new_tokens=0, steps=span, kv_cache=kv_cache)
        else:
            out = torch.cat([rows[:, :start], _greedy(model, rows[:, :start], span), rows[:, start + span:]], 1)
        filled.append(out.cpu())
    filled = torch.cat(filled)
    hit = filled[:, start:start + span] == x[:, start:start + span]
    result = {"method": "diffusion" if diffusion else "left_context_greedy", "examples": x.shape[0], "span": span,
              "span_start": start, "token_accuracy": hit.double().mean().item(),
              "span_exact_match": hit.all(1).double().mean().item(), "ar_parent": ar_name,
              "ar_parent_nll": None, "reference_ar_parent_nll": None}
    if ar_scorer is not None:
        result["ar_parent_nll"] = nll_after(ar_scorer, filled, start, batch_size)
        result["reference_ar_parent_nll"] = nll_after(ar_scorer, x, start, batch_size)
    return result


# ------------------------------------------------------------------------------------------- steps sweep

def repeat_task(sequences: torch.Tensor, tokenizer, *, examples: int, length: int, seed: int, mask_id=None,
                repeats: int = 2, pool: int = 64):
    """A copying task with a checkable answer: a random sequence of `length` frequent tokens shown `repeats`
    times (after BOS if the tokenizer has one); the answer is one more repetition. Tokens come from the most
    frequent ordinary tokens of the evaluation text, so they are ones the model has learnt. Returns
    (prompts (examples, P), answers (examples, length))."""
    counts = torch.bincount(sequences.flatten(), minlength=int(sequences.max()) + 1)
    for special in set(tokenizer.all_special_ids) | ({mask_id} if mask_id is not None else set()):
        if special < len(counts):
            counts[special] = 0
    candidates = counts.sort(descending=True, stable=True).indices[: min(pool, int((counts > 0).sum()))]
    if len(candidates) < 2:
        raise AdaptError("the evaluation text has fewer than 2 distinct ordinary tokens: no copying task possible")
    g = torch.Generator().manual_seed(seed)
    answers = candidates[torch.randint(len(candidates), (examples, length), generator=g)]
    prompts = answers.repeat(1, repeats)
    if tokenizer.bos_token_id is not None:
        prompts = torch.cat([torch.full((examples, 1), tokenizer.bos_token_id), prompts], 1)
    return prompts, answers


@torch.no_grad()
def steps_sweep(model, sequences: torch.Tensor, tokenizer, *, length: int = 16, steps: list[int] | None = None,
                examples: int = 32, prompt_tokens: int = 16, batch_size: int = 16, seed: int = 0,
                ar_scorer=None, ar_name: str | None = None, kv_cache: str | None = None) -> dict:
    """Quality against the number of decoding passes for `length` new tokens (one block, temperature 0, the
    generation config's order: most confident first unless it says otherwise; `kv_cache` as in
    `diffusion_generate`). Sequence level: exact match on `repeat_task`; token level: that task's token accuracy and
    the AR scorer's NLL of free continuations of `prompt_tokens`-token prompts from the text. Token quality
    saturates with few steps while whole-sequence correctness needs more (REFERENCE §7): the two error curves
    show that gap. `reference`: the AR scorer (or the causal model evaluated) decoding greedily, one token per
    forward."""
    steps = sorted(set(steps or [2 ** i for i in range(int(math.log2(length)) + 1)]))
    if any(not 1 <= s <= length for s in steps):
        raise AdaptError(f"sweep steps must be between 1 and the sweep length {length}, got {steps}")
    if sequences.shape[1] <= prompt_tokens:
        raise AdaptError(f"sequences of {sequences.shape[1]} tokens are too short for {prompt_tokens}-token prompts")
    diffusion = kind_of(model) == DIFFUSION
    task_prompts, answers = repeat_task(sequences, tokenizer, examples=examples, length=length, seed=seed,
                                        mask_id=getattr(model.config, "mask_token_id", None) if diffusion else None)
    free_prompts = sequences[:examples, :prompt_tokens]

    def score(decode) -> dict:
        task = _batched(decode, task_prompts, batch_size)
        free = _batched(decode, free_prompts, batch_size)
        hit = task == answers
        row = {"task_token_accuracy": hit.double().mean().item(), "task_exact_match": hit.all(1).double().mean().item(),
               "ar_parent_nll": None, "distinct_tokens": _distinct(free)}
        if ar_scorer is not None:
            text = torch.cat([free_prompts, free], 1)
            row["ar_parent_nll"] = nll_after(ar_scorer, text, prompt_tokens, batch_size)
        return row

    points = []
    if diffusion:
        for s in steps:
            points.append({"steps": s, "tokens_per_step": length / s,
                           **score(lambda p, s=s: _sample(model, p, max_new_tokens=length, steps=s,
                                                          kv_cache=kv_cache)[:, p.shape[1]:])})
    reference_model = model if not diffusion else ar_scorer
    reference = None
    if reference_model is not None:
        reference = {"method": "ar_greedy", "model": ar_name if diffusion else "self",
                     **score(lambda p: _greedy(reference_model, p, length))}
    return {"task": "repeat", "length": length, "examples": examples, "prompt_tokens": prompt_tokens,
            "ar_parent": ar_name, "points": points, "reference": reference}


def plot_steps_sweep(sweep: dict, path: str | Path, title: str = "") -> Path:
    """Two panels: task token error and sequence error against steps; AR-parent NLL of free text against steps.
    Dashed lines: the AR reference."""
    plt = load_pyplot()
    points, ref = sweep["points"], sweep["reference"]
    steps = [p["steps"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(steps, [1 - p["task_token_accuracy"] for p in points], "o-", color="tab:blue",
              label="token error (1 − token accuracy)")
    left.plot(steps, [1 - p["task_exact_match"] for p in points], "s-", color="tab:red",
              label="sequence error (1 − exact match)")
    if ref is not None:
        left.axhline(1 - ref["task_token_accuracy"], color="tab:blue", ls="--", lw=1, label="AR greedy, token")
        left.axhline(1 - ref["task_exact_match"], color="tab:red", ls="--", lw=1, label="AR greedy, sequence")
    left.set_ylim(-0.03, 1.03)
    left.set_ylabel("error rate")
    left.set_title(f"repeat task, {sweep['length']} tokens, {sweep['examples']} examples")
    nll = [p["ar_parent_nll"] for p in points]
    if any(v is not None for v in nll):
        right.plot(steps, nll, "o-", color="tab:green", label="diffusion")
    if ref is not None and ref["ar_parent_nll"] is not None:
        right.axhline(ref["ar_parent_nll"], color="tab:green", ls="--", lw=1, label="AR greedy")
    if not any(v is not None for v in nll) and (ref is None or ref["ar_parent_nll"] is None):
        right.text(0.5, 0.5, "no AR parent to score with", ha="center", transform=right.transAxes)
    right.set_ylabel("AR-parent NLL of generated tokens (nats)")
    right.set_title(f"free continuation, {sweep['length']} tokens")
    for ax in (left, right):
        if steps:
            ax.set_xscale("log", base=2)
            ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_xlabel("decoding steps (forward passes)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load_pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise AdaptError("--plot needs matplotlib: pip install 'dlm-adapt[eval]'") from e
    return plt


def kind_of(model) -> str:
    return DIFFUSION if is_diffusion_model(model) else CAUSAL


# ------------------------------------------------------------------------------------------------ decode

def _sample(model, ids, *, max_new_tokens: int, steps: int, kv_cache: str | None):
    """The model's own `diffusion_generate` at temperature 0, one block, no early stop at EOS (the checks compare
    fixed-length outputs); the rest as its generation config says."""
    options = SamplingOptions(max_new_tokens=max_new_tokens, steps=steps, kv_cache=kv_cache)
    return model.diffusion_generate(ids.to(model_device(model)), stop_at_eos=False, **options.kwargs())


@torch.no_grad()
def _greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy tokens from a causal LM, EOS included as an ordinary token (spans of packed text contain EOS)."""
    ids = prompt.to(model_device(model))
    for _ in range(n):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[:, prompt.shape[1]:].to(prompt.device)


def _batched(decode, prompts: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([decode(prompts[i:i + batch_size]).cpu() for i in range(0, prompts.shape[0], batch_size)])


def _distinct(tokens: torch.Tensor) -> float:
    return sum(len(set(row.tolist())) / len(row) for row in tokens) / len(tokens)
