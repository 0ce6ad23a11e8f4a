# The diffusion sampler. Written into every converted checkpoint beside the modeling file (imports only torch),
# and the one implementation used by `dlm-adapt generate`, `adapt.sampling` and `model.diffusion_generate`.
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

REMASKING = ("low_confidence", "margin", "entropy", "random")
SCHEDULES = ("linear", "cosine")


class SamplingError(ValueError):
    """Invalid sampling arguments (steps, block length, prompt length ...)."""


@dataclass
class SamplingOutput:
    sequences: torch.LongTensor
    """(batch, prompt_len + max_new_tokens); after a committed EOS the rest of a row is EOS."""
    nfe: int
    """Forward passes of the model."""
    committed_per_step: list[int] = field(default_factory=list)
    """Tokens committed at each forward pass, summed over the batch."""
    history: list[torch.LongTensor] | None = None
    """The canvas after every step, if asked for."""
    row_nfe: torch.LongTensor | None = None
    """Per row, the passes in which it still had masks: its `nfe` had it been decoded alone."""
    row_committed: torch.LongTensor | None = None
    """Per row, the tokens committed."""

    @property
    def tokens_per_forward(self) -> float:
        """Tokens committed per pass a row needed, over the batch (a batch runs as long as its slowest row)."""
        return int(self.row_committed.sum()) / max(1, int(self.row_nfe.sum()))


def commit_schedule(n: int, steps: int, kind: str = "linear") -> list[int]:
    """How many of `n` masked tokens to commit at each of `steps` steps. `linear` spreads them evenly, earlier
    steps taking the remainder (LLaDA); `cosine` commits few first and more later (MaskGIT)."""
    if kind == "linear":
        return [n // steps + (1 if s < n % steps else 0) for s in range(steps)]
    remaining = [round(n * math.cos(math.pi / 2 * (s + 1) / steps)) for s in range(steps)]
    done, counts = n, []
    for r in remaining:
        counts.append(done - r)
        done = r
    return counts


def _filter(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), -math.inf)
    return logits


def diffusion_sample(
    model_fn: Callable[[torch.LongTensor, torch.Tensor | None], torch.Tensor],
    input_ids: torch.LongTensor,
    *,
    mask_token_id: int,
    shift: bool,
    max_new_tokens: int,
    steps: int,
    attention_mask: torch.Tensor | None = None,
    block_length: int | None = None,
    remasking: str = "low_confidence",
    schedule: str = "linear",
    threshold: float | None = None,
    temperature: float = 0.0,
    order_temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    min_new_tokens: int = 0,
    max_positions: int | None = None,
    generator: torch.Generator | None = None,
    return_history: bool = False,
    window_fn: Callable | None = None,
) -> SamplingOutput:
    """Masked-diffusion decoding.

    The canvas is the prompt (left-padded rows marked by `attention_mask`; mask tokens inside it are holes to
    infill) followed by `max_new_tokens` mask tokens, decoded in blocks of `block_length` left to right, each
    block in steps/(max_new_tokens/block_length) forward passes. Each pass predicts every masked position
    (token: argmax at temperature 0, else Gumbel-max in float64 after top-k/top-p; confidences always use the
    unfiltered probabilities) and commits the positions
    ranked first by `remasking` (`low_confidence`: highest probability; `margin`: top-1 minus top-2 probability;
    `entropy`: lowest entropy; `random`), as many as `schedule` says, or with `threshold` every position whose
    probability is at least the threshold plus the best one (Fast-dLLM); then a block may take fewer passes.
    `order_temperature` > 0 samples the order instead of sorting. Holes in the prompt are eligible from the
    first block on. A row whose EOS is committed with nothing masked before it is finished: the rest becomes EOS.

    `model_fn(canvas, attention_mask)` returns logits for every canvas position. `window_fn(canvas,
    attention_mask, lo, hi, refresh)` replaces it when given and returns only the predictions for the tokens at
    positions [lo, hi) (shift already applied), the span that can change in the current block: from the block
    start (or the first hole in the prompt) to the block end. `refresh` is True on the first pass of each block
    and the span is fixed until the next one, which is what a once-per-block KV cache needs.
    """
    batch, prompt_len = input_ids.shape
    n = max_new_tokens
    block_length = block_length or n
    if n < 0:
        raise SamplingError(f"max_new_tokens must be 0 or more, got {n}")
    if n == 0 and not _holes(input_ids, mask_token_id, attention_mask).any():
        raise SamplingError("nothing to decode: max_new_tokens is 0 and the prompt has no mask tokens (holes); "
                            "ask for new tokens, or mark holes to infill")
    if steps < 1:
        raise SamplingError(f"steps must be at least 1, got {steps}")
    if n > 0 and block_length < 1:
        raise SamplingError(f"block_length must be at least 1, got {block_length}")
    for name, value, ok, allowed in (
        ("temperature", temperature, temperature >= 0, ">= 0 (0: greedy)"),
        ("order_temperature", order_temperature, order_temperature >= 0, ">= 0 (0: ranked order)"),
        ("top_k", top_k, top_k is None or top_k >= 1, ">= 1, or unset"),
        ("top_p", top_p, top_p is None or 0 < top_p <= 1, "in (0, 1], or unset"),
        ("min_new_tokens", min_new_tokens, min_new_tokens >= 0, ">= 0"),
    ):
        if not ok:
            raise SamplingError(f"{name} must be {allowed}, got {value}")
    if remasking not in REMASKING:
        raise SamplingError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if schedule not in SCHEDULES:
        raise SamplingError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise SamplingError(f"threshold must be in (0, 1], got {threshold}")
    if mask_token_id is None:
        raise SamplingError("the model has no mask token (config.mask_token_id); convert it with dlm-adapt convert")
    if n > 0 and n % block_length:
        raise SamplingError(f"max_new_tokens ({n}) must be a multiple of block_length ({block_length})")
    blocks = max(1, n // block_length) if n else 1
    if steps % blocks:
        raise SamplingError(f"steps ({steps}) must be a multiple of the number of blocks ({blocks} = "
                            f"max_new_tokens / block_length)")
    if max_positions is not None and prompt_len + n > max_positions:
        raise SamplingError(f"prompt ({prompt_len}) + max_new_tokens ({n}) exceeds the model's {max_positions} positions")
    if shift and prompt_len == 0:
        raise SamplingError("this model uses shift: the prompt needs at least one token (e.g. BOS)")
    if shift and ((input_ids[:, :1] == mask_token_id) & (attention_mask[:, :1].bool() if attention_mask is not None
                                                         else True)).any():
        raise SamplingError("with shift, the first prompt token cannot be a hole (nothing predicts it)")

    device = input_ids.device
    canvas = torch.cat([input_ids, input_ids.new_full((batch, n), mask_token_id)], dim=1)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, n))], dim=1)
        real = attention_mask.bool()
    else:
        real = torch.ones_like(canvas, dtype=torch.bool)
    position = torch.arange(canvas.shape[1], device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out = SamplingOutput(sequences=canvas, nfe=0, history=[] if return_history else None,
                         row_nfe=torch.zeros(batch, dtype=torch.long, device=device),
                         row_committed=torch.zeros(batch, dtype=torch.long, device=device))
    steps_per_block = steps // blocks

    for b in range(blocks):
        block_end = prompt_len + (b + 1) * block_length if n else prompt_len
        eligible_region = (position[None] < block_end) & real & ~done[:, None]
        masked = (canvas == mask_token_id) & eligible_region
        counts = masked.sum(1)
        plan = torch.stack([torch.tensor(commit_schedule(int(c), steps_per_block, schedule)) for c in counts]).to(device)
        # everything after this block's span is fixed for the block: compute and sort only inside it
        lo = min([prompt_len + b * block_length] + masked.any(0).nonzero()[:1, 0].tolist())
        span = slice(lo, block_end)
        for s in range(steps_per_block if threshold is None else int(counts.max())):
            masked = (canvas[:, span] == mask_token_id) & eligible_region[:, span] & ~done[:, None]
            if not masked.any():
                break
            if window_fn is not None:
                logits = window_fn(canvas, attention_mask, lo, block_end, s == 0)
            else:  # with shift the logit at i-1 predicts the token at i
                logits = model_fn(canvas, attention_mask)[:, lo - int(shift):block_end - int(shift)]
            out.nfe += 1
            out.row_nfe += masked.any(1)
            logits = logits.double()
            logits[..., mask_token_id] = -math.inf
            if eos_token_id is not None and min_new_tokens > 0:
                early = (position[span] >= prompt_len) & (position[span] < prompt_len + min_new_tokens)
                logits[:, early, eos_token_id] = -math.inf
            probs = logits.softmax(-1)  # confidences come from the model's distribution, not the filtered one
            if temperature > 0:
                filtered = _filter(logits, top_k, top_p)
                u = torch.rand(logits.shape, dtype=torch.float64, device=device, generator=generator)
                tokens = (filtered / temperature - torch.log(-torch.log(u.clamp_min(1e-300)))).argmax(-1)
            else:
                tokens = logits.argmax(-1)
            p_token = probs.gather(-1, tokens[..., None])[..., 0]
            if remasking == "low_confidence":
                score = p_token
            elif remasking == "margin":
                top2 = probs.topk(2, dim=-1).values
                score = top2[..., 0] - top2[..., 1]
            elif remasking == "entropy":
                score = (probs * probs.clamp_min(1e-300).log()).sum(-1)  # −entropy
            else:
                score = torch.rand(p_token.shape, dtype=torch.float64, device=device, generator=generator)
            if order_temperature > 0:
                g = torch.rand(score.shape, dtype=torch.float64, device=device, generator=generator)
                score = score / order_temperature - torch.log(-torch.log(g.clamp_min(1e-300)))
            score = score.masked_fill(~masked, -math.inf)
            ranks = score.argsort(dim=1, descending=True).argsort(dim=1)
            if threshold is None:
                commit = masked & (ranks < plan[:, s, None])
            else:
                commit = masked & ((ranks == 0) | (p_token >= threshold))
            canvas[:, span] = torch.where(commit, tokens, canvas[:, span])
            out.committed_per_step.append(int(commit.sum()))
            out.row_committed += commit.sum(1)
            if return_history:
                out.history.append(canvas.clone())
        if eos_token_id is not None and n:
            done = _finish_rows(canvas, prompt_len, eos_token_id, mask_token_id, done)
            if done.all():
                break
    out.sequences = canvas
    return out


def _holes(input_ids, mask_token_id, attention_mask=None):
    """Per row, the number of mask tokens in the prompt (positions to infill), padding excluded."""
    holes = input_ids == mask_token_id
    if attention_mask is not None:
        holes &= attention_mask.bool()
    return holes.sum(1)


def _finish_rows(canvas, prompt_len, eos_token_id, mask_token_id, done):
    """Rows whose first generated EOS has no mask before it are complete: everything after it becomes EOS."""
    generated = canvas[:, prompt_len:]
    is_eos = generated == eos_token_id
    has_eos = is_eos.any(1)
    first = torch.where(has_eos, is_eos.float().argmax(1), torch.full_like(has_eos, generated.shape[1], dtype=torch.long))
    idx = torch.arange(generated.shape[1], device=canvas.device)[None]
    settled = ~((generated == mask_token_id) & (idx < first[:, None])).any(1)
    finished = has_eos & settled
    generated[finished[:, None] & (idx > first[:, None])] = eos_token_id
    return done | finished
