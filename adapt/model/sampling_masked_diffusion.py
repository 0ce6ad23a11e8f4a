# The diffusion sampler. Written into every converted checkpoint beside the modeling file (imports only torch),
# and the one implementation behind `model.diffusion_generate`, `dlm-adapt generate`, `dlm-adapt eval` and
# `adapt.sampling`.
"""Masked-diffusion decoding, assembled from four parts, each swappable without touching the loop:

- a denoiser (`Denoiser`): the model's predictions for the canvas positions that can change; the only place that
  knows about shift and KV caches;
- a block iterator (`semi_autoregressive_blocks`): which spans of the canvas are decoded, in which order;
- a scoring rule (`SCORES`, chosen by `remasking`): which masked positions are committed first;
- a commit rule (`ScheduleCommit`, `ThresholdCommit`, `EntropyBoundCommit`): how many are committed per forward
  pass.

A streamer (transformers' `TextStreamer` protocol: `put(ids)`, `end()`) receives each block's tokens once final.

`check_sampling_options` validates every scalar option and needs no model, so front ends call it before loading one.
"""
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

SCHEDULES = ("linear", "cosine")
KV_CACHES = ("prefix", "dual")  # implemented by the modeling file's denoisers


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
    cache_hits: int | None = None
    """Block decoding: canvas positions whose keys/values a pass read from the KV cache instead of computing them,
    summed over passes (per row). None where not measured (full-sequence decoding)."""
    positions_computed: int | None = None
    """Block decoding: canvas positions the decoder ran on, summed over passes (per row): the prompt's prefill,
    each block's passes, and each finished block once more as it enters the cache."""

    @property
    def tokens_per_forward(self) -> float:
        """Tokens committed per pass a row needed, over the batch (a batch runs as long as its slowest row)."""
        return int(self.row_committed.sum()) / max(1, int(self.row_nfe.sum()))

    @classmethod
    def start(cls, canvas: torch.LongTensor, return_history: bool):
        """Nothing decoded yet: `sequences` is the canvas, which the sampler fills in place."""
        zeros = torch.zeros(canvas.shape[0], dtype=torch.long, device=canvas.device)
        return cls(sequences=canvas, nfe=0, history=[] if return_history else None, row_nfe=zeros,
                   row_committed=zeros.clone())

    def record(self, masked: torch.Tensor, committed: torch.Tensor, canvas: torch.LongTensor):
        """Count one forward pass: `masked`, the span's masked positions before it, `committed`, those it filled."""
        self.nfe += 1
        self.row_nfe += masked.any(1)
        self.committed_per_step.append(int(committed.sum()))
        self.row_committed += committed.sum(1)
        if self.history is not None:
            self.history.append(canvas.clone())


# ------------------------------------------------------------------------------------------------ validation

def check_sampling_options(*, max_new_tokens=None, steps=None, block_length=None, remasking=None, schedule="linear",
                           threshold=None, entropy_bound=None, temperature=0.0, order_temperature=0.0, top_k=None,
                           top_p=None, min_new_tokens=0, kv_cache=None, sub_block=None, **_not_checked):
    """Raise `SamplingError` for the first option out of range. `None` means not chosen yet: the checkpoint's
    generation_config decides, and the sampler checks again once it has. Takes whatever `diffusion_generate`
    takes, so a front end hands over its options unchanged; those with no range (generator ...) are not looked at.
    """
    n = max_new_tokens
    if n is not None and n < 0:
        raise SamplingError(f"max_new_tokens must be 0 or more, got {n}")
    if steps is not None and steps < 1:
        raise SamplingError(f"steps must be at least 1, got {steps}")
    if n != 0 and block_length is not None and block_length < 0:  # 0, like None, is one block
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
    if n is not None and min_new_tokens > n > 0:  # EOS would be forbidden everywhere: a contradiction, not a limit
        raise SamplingError(f"min_new_tokens ({min_new_tokens}) exceeds max_new_tokens ({n}); lower min_new_tokens "
                            "or raise max_new_tokens")
    if remasking is not None and remasking not in SCORES:
        raise SamplingError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if schedule not in SCHEDULES:
        raise SamplingError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise SamplingError(f"threshold must be in (0, 1], got {threshold}")
    if entropy_bound is not None and not entropy_bound > 0:
        raise SamplingError(f"entropy_bound (the EB-sampler's gamma) must be > 0, got {entropy_bound}")
    if threshold is not None and entropy_bound is not None:
        raise SamplingError("threshold and entropy_bound are two commit rules: choose one")
    if sub_block is not None and sub_block < 1:
        raise SamplingError(f"sub_block must be at least 1, got {sub_block}")
    if kv_cache is not None and kv_cache not in KV_CACHES:
        raise SamplingError(f"kv_cache must be None, 'prefix' or 'dual', got {kv_cache!r}")
    if n and block_length:
        if n % block_length:
            raise SamplingError(f"max_new_tokens ({n}) must be a multiple of block_length ({block_length})")
        if steps is not None and steps % (n // block_length):
            raise SamplingError(f"steps ({steps}) must be a multiple of the number of blocks ({n // block_length} = "
                                f"max_new_tokens / block_length)")


def _check_prompt(input_ids, attention_mask, *, mask_token_id, shift, max_new_tokens, max_positions):
    """What the options cannot say alone: whether this prompt, on this model, leaves something to decode."""
    prompt_len = input_ids.shape[1]
    if mask_token_id is None:
        raise SamplingError("the model has no mask token (config.mask_token_id); convert it with dlm-adapt convert")
    if max_new_tokens == 0 and not _holes(input_ids, mask_token_id, attention_mask).any():
        raise SamplingError("nothing to decode: max_new_tokens is 0 and the prompt has no mask tokens (holes); "
                            "ask for new tokens, or mark holes to infill")
    if max_positions is not None and prompt_len + max_new_tokens > max_positions:
        raise SamplingError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                            f"{max_positions} positions")
    if shift and prompt_len == 0:
        raise SamplingError("this model uses shift: the prompt needs at least one token (e.g. BOS)")
    real_first = attention_mask[:, :1].bool() if attention_mask is not None else True
    if shift and ((input_ids[:, :1] == mask_token_id) & real_first).any():
        raise SamplingError("with shift, the first prompt token cannot be a hole (nothing predicts it)")


# ------------------------------------------------------------------------------------------------- denoisers

class Denoiser:
    """What the loop asks of a model: `denoiser(canvas, attention_mask, lo, hi)` returns logits (batch, hi - lo,
    vocab) predicting the tokens at canvas positions [lo, hi), the span that can change.

    Between two calls with the same span only tokens inside it have changed, so a subclass may reuse what it
    computed for the rest (a KV cache); a new span starts a new block. One denoiser serves one decode. Subclasses
    give `logits(canvas, attention_mask, first, last)`, the model's logits at positions [first, last); shift is
    applied here and nowhere else."""

    def __init__(self, shift: bool):
        self.shift = int(shift)

    def __call__(self, canvas, attention_mask, lo: int, hi: int) -> torch.Tensor:
        # with shift the logit at i-1 predicts the token at i
        return self.logits(canvas, attention_mask, lo - self.shift, hi - self.shift)

    def logits(self, canvas, attention_mask, first: int, last: int) -> torch.Tensor:
        raise NotImplementedError

    def finished(self, done: torch.Tensor):
        """`done` (batch,) bool: rows that need no more predictions (their logits may be anything from now on), so
        a denoiser may stop computing them. Rows never come back."""


class FunctionDenoiser(Denoiser):
    """A plain `model_fn(canvas, attention_mask)` returning logits for every position, run whole on every pass."""

    def __init__(self, model_fn: Callable[[torch.LongTensor, torch.Tensor | None], torch.Tensor], shift: bool):
        super().__init__(shift)
        self.model_fn = model_fn

    def logits(self, canvas, attention_mask, first, last):
        return self.model_fn(canvas, attention_mask)[:, first:last]


# ------------------------------------------------------------------------------------------- block iterators

def semi_autoregressive_blocks(prompt_len: int, max_new_tokens: int, block_length: int) -> list[tuple[int, int]]:
    """Spans [start, end) decoded one after the other: the new tokens in blocks, left to right (LLaDA). Infilling
    alone is one empty span; the loop widens every span leftwards over holes still masked."""
    if max_new_tokens == 0:
        return [(prompt_len, prompt_len)]
    return [(start, start + block_length) for start in range(prompt_len, prompt_len + max_new_tokens, block_length)]


# ------------------------------------------------------------------------------------------------ predictions

@dataclass
class TokenRule:
    """Per position of the span, the token to commit (argmax at temperature 0, else Gumbel-max in float64 after
    top-k/top-p) and the model's distribution there, never the filtered one: confidences come from it."""
    mask_token_id: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: int | None = None
    no_eos: tuple[int, int] = (0, 0)
    """Canvas positions [a, b) where EOS is forbidden (`min_new_tokens`)."""
    generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor, positions: torch.Tensor):
        logits = logits.double()
        logits[..., self.mask_token_id] = -math.inf
        if self.eos_token_id is not None and self.no_eos[0] < self.no_eos[1]:
            # positions: (span,) canvas indices, or (batch, span) where rows' new tokens start apart (block mode)
            forbid = (positions >= self.no_eos[0]) & (positions < self.no_eos[1])
            logits[..., self.eos_token_id] = logits[..., self.eos_token_id].masked_fill(forbid, -math.inf)
        probs = logits.softmax(-1)
        if self.temperature > 0:
            u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=self.generator)
            gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
            tokens = (_filter(logits, self.top_k, self.top_p) / self.temperature + gumbel).argmax(-1)
        else:
            tokens = logits.argmax(-1)
        return tokens, probs, probs.gather(-1, tokens[..., None])[..., 0]


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


# Scoring rules: (probs, p_token, generator) -> a score per position; the highest is committed first.

def confidence_score(probs, p_token, generator):
    """The probability of the predicted token (LLaDA's low-confidence remasking)."""
    return p_token


def margin_score(probs, p_token, generator):
    """Top-1 minus top-2 probability."""
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def entropy_score(probs, p_token, generator):
    """Minus the entropy: the most peaked distributions first."""
    return (probs * probs.clamp_min(1e-300).log()).sum(-1)


def random_score(probs, p_token, generator):
    """A uniformly random order."""
    return torch.rand(p_token.shape, dtype=torch.float64, device=p_token.device, generator=generator)


SCORES = {"low_confidence": confidence_score, "margin": margin_score, "entropy": entropy_score,
          "random": random_score}
REMASKING = tuple(SCORES)


@dataclass
class Ranking:
    """Ranks the span's masked positions by a scoring rule (0 = commit first); `order_temperature` > 0 samples the
    order (Gumbel-perturbed scores) instead of sorting."""
    score: Callable
    order_temperature: float = 0.0
    generator: torch.Generator | None = None

    def __call__(self, probs, p_token, masked):
        score = self.score(probs, p_token, self.generator)
        if self.order_temperature > 0:
            g = torch.rand(score.shape, dtype=torch.float64, device=score.device, generator=self.generator)
            score = score / self.order_temperature - torch.log(-torch.log(g.clamp_min(1e-300)))
        return score.masked_fill(~masked, -math.inf).argsort(dim=1, descending=True).argsort(dim=1)


# ------------------------------------------------------------------------------------------------ commit rules

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


class ScheduleCommit:
    """A fixed number of passes per block; each commits the best-ranked positions, as many as `commit_schedule`
    plans for the row's masked count at the block start."""

    def __init__(self, steps_per_block: int, schedule: str):
        self.steps, self.schedule, self.plan = steps_per_block, schedule, None

    def passes(self, counts: torch.Tensor) -> int:
        self.plan = torch.stack([torch.tensor(commit_schedule(int(c), self.steps, self.schedule))
                                 for c in counts]).to(counts.device)
        return self.steps

    def __call__(self, step, masked, ranks, probs, p_token):
        return masked & (ranks < self.plan[:, step, None])


class ThresholdCommit:
    """Fast-dLLM's parallel decoding: each pass commits the best-ranked position plus every one whose probability
    is at least `threshold`, so a block takes as few passes as the model's confidence allows."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def passes(self, counts: torch.Tensor) -> int:
        return int(counts.max())  # at least one per pass: never more passes than masks

    def __call__(self, step, masked, ranks, probs, p_token):
        return masked & ((ranks == 0) | (p_token >= self.threshold))


class EntropyBoundCommit:
    """The EB-sampler (Ben-Hamu et al. 2025): each pass commits the longest prefix of the ranked positions whose
    entropies, summed, exceed their largest by at most `bound` (gamma, nats). The bound limits the dependence that
    committing them together can ignore; the best-ranked position always goes (its sum minus max is 0)."""

    def __init__(self, bound: float):
        self.bound = bound

    def passes(self, counts: torch.Tensor) -> int:
        return int(counts.max())

    def __call__(self, step, masked, ranks, probs, p_token):
        entropy = -(probs * probs.clamp_min(1e-300).log()).sum(-1).masked_fill(~masked, 0.0)
        ranked = torch.zeros_like(entropy).scatter(1, ranks, entropy)  # ranked[:, r]: the entropy ranked r-th
        # sum - max only grows along the ranking, so the positions within the bound are a prefix of it
        within = ranked.cumsum(1) - ranked.cummax(1).values <= self.bound
        return masked & (ranks < within.sum(1, keepdim=True))


def commit_rule(steps_per_block: int, schedule: str, threshold: float | None, entropy_bound: float | None):
    """The commit rule the options choose: a fixed schedule unless a threshold or an entropy bound is given."""
    if threshold is not None:
        return ThresholdCommit(threshold)
    if entropy_bound is not None:
        return EntropyBoundCommit(entropy_bound)
    return ScheduleCommit(steps_per_block, schedule)


class Stream:
    """Hands streamers (transformers' streamer protocol: `put(ids)`, `end()`) new tokens as they become final, up
    to EOS; the prompt first, as `generate` does (a `TextStreamer(skip_prompt=True)` skips it). `streamer` is one
    streamer (batch size 1) or a list with one per row (None: that row is not streamed), e.g. a server's requests
    decoded as one batch. A row's streamer whose `cancelled` attribute turns true (its client left) stops that row:
    `stopped` adds it to the rows that are done."""

    def __init__(self, streamer, prompt: torch.LongTensor, eos_token_id: int | None):
        self.eos, self.rows = eos_token_id, list(streamer) if isinstance(streamer, (list, tuple)) else [streamer]
        if isinstance(streamer, (list, tuple)) and len(self.rows) != prompt.shape[0]:
            raise SamplingError(f"one streamer per row: got {len(self.rows)} streamers for {prompt.shape[0]} rows")
        if streamer is not None and not isinstance(streamer, (list, tuple)) and prompt.shape[0] != 1:
            raise SamplingError(f"streaming decodes one prompt at a time (batch size 1, as transformers' "
                                f"streamers take; or a list of streamers, one per row), got {prompt.shape[0]}")
        self.sent, self.over = [0] * len(self.rows), [s is None for s in self.rows]
        for row, s in enumerate(self.rows):
            if s is not None:
                s.put(prompt[row: row + 1].cpu())

    def final(self, new_tokens):
        """`new_tokens`: per row (a 2-D tensor, or a list of 1-D ones), the row's first new tokens, all final."""
        for row, s in enumerate(self.rows):
            if self.over[row]:
                continue
            chunk = new_tokens[row][self.sent[row]:]
            if self.eos is not None and (chunk == self.eos).any():
                chunk, self.over[row] = chunk[: int((chunk == self.eos).nonzero()[0, 0]) + 1], True
            if len(chunk):
                s.put(chunk.cpu())
                self.sent[row] += len(chunk)

    def stopped(self, done: torch.Tensor) -> torch.Tensor:
        """`done`, plus the rows whose streamer was cancelled (which get nothing more)."""
        gone = [bool(getattr(s, "cancelled", False)) for s in self.rows]
        self.over = [over or g for over, g in zip(self.over, gone)]
        return done | torch.tensor(gone, device=done.device) if any(gone) else done

    def end(self):
        for s in self.rows:
            if s is not None:
                s.end()


# ------------------------------------------------------------------------------------------------------ loop

def diffusion_sample(
    denoiser: Denoiser | Callable[[torch.LongTensor, torch.Tensor | None], torch.Tensor],
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
    entropy_bound: float | None = None,
    temperature: float = 0.0,
    order_temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    min_new_tokens: int = 0,
    max_positions: int | None = None,
    generator: torch.Generator | None = None,
    return_history: bool = False,
    streamer=None,
) -> SamplingOutput:
    """Masked-diffusion decoding.

    The canvas is the prompt (left-padded rows marked by `attention_mask`; mask tokens inside it are holes to
    infill) followed by `max_new_tokens` mask tokens, decoded in blocks of `block_length` left to right, each
    block in steps/(max_new_tokens/block_length) forward passes. Each pass predicts every masked position of the
    block (`TokenRule`) and commits the positions ranked first by `remasking` (`SCORES`: `low_confidence`,
    `margin`, `entropy`, `random`), as many as `schedule` says, or with `threshold` every position whose
    probability is at least the threshold plus the best one (Fast-dLLM), or with `entropy_bound` the EB-sampler's
    entropy-bounded prefix of the ranking (`EntropyBoundCommit`); then a block may take fewer passes.
    `order_temperature` > 0 samples the order instead of sorting. Holes in the prompt are eligible from the
    first block on. A row whose EOS is committed with nothing masked before it is finished: the rest becomes EOS.

    `denoiser` is a `Denoiser`, or a plain `model_fn(canvas, attention_mask)` returning logits for every canvas
    position (run as a `FunctionDenoiser`, shift applied there). `streamer` gets each block's new tokens once the
    block is done (one prompt; not with holes, which it could not show).
    """
    n, block_length = max_new_tokens, block_length or max_new_tokens
    check_sampling_options(max_new_tokens=n, steps=steps, block_length=block_length, remasking=remasking,
                           schedule=schedule, threshold=threshold, entropy_bound=entropy_bound,
                           temperature=temperature, order_temperature=order_temperature, top_k=top_k, top_p=top_p,
                           min_new_tokens=min_new_tokens)
    _check_prompt(input_ids, attention_mask, mask_token_id=mask_token_id, shift=shift, max_new_tokens=n,
                  max_positions=max_positions)
    if not isinstance(denoiser, Denoiser):
        denoiser = FunctionDenoiser(denoiser, shift)
    batch, prompt_len = input_ids.shape
    blocks = semi_autoregressive_blocks(prompt_len, n, block_length)
    commit = commit_rule(steps // len(blocks), schedule, threshold, entropy_bound)
    if streamer is not None and _holes(input_ids, mask_token_id, attention_mask).any():
        raise SamplingError("streaming shows new tokens: it cannot show holes filled in the prompt; infill without "
                            "a streamer")
    stream = Stream(streamer, input_ids, eos_token_id)
    choose = TokenRule(mask_token_id, temperature, top_k, top_p, eos_token_id,
                       (prompt_len, prompt_len + min_new_tokens), generator)
    rank = Ranking(SCORES[remasking], order_temperature, generator)
    canvas, attention_mask, real = _masked_canvas(input_ids, attention_mask, n, mask_token_id)
    out = SamplingOutput.start(canvas, return_history)
    position = torch.arange(canvas.shape[1], device=canvas.device)
    done = torch.zeros(batch, dtype=torch.bool, device=canvas.device)

    for start, end in blocks:
        eligible = (position[None] < end) & real & ~done[:, None]
        masked = (canvas == mask_token_id) & eligible
        lo = min([start] + masked.any(0).nonzero()[:1, 0].tolist())  # reach back to holes still masked
        denoise_span(denoiser, canvas, attention_mask, lo, end, eligible, masked.sum(1), position,
                     mask_token_id=mask_token_id, commit=commit, choose=choose, rank=rank, out=out)
        if eos_token_id is not None and n:
            done = _finish_rows(canvas, prompt_len, eos_token_id, mask_token_id, done)
        stream.final(canvas[:, prompt_len:end])
        done = stream.stopped(done)
        if done.all():
            break
    stream.end()
    return out


def _masked_canvas(input_ids, attention_mask, n, mask_token_id):
    """The prompt followed by `n` mask tokens; its attention mask (None stays None) and its real positions."""
    batch = input_ids.shape[0]
    canvas = torch.cat([input_ids, input_ids.new_full((batch, n), mask_token_id)], dim=1)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, n))], dim=1)
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(canvas, dtype=torch.bool)
    return canvas, attention_mask, real


def denoise_span(denoiser, canvas, attention_mask, lo, end, eligible, counts, position, *, mask_token_id, commit,
                 choose, rank, out):
    """Denoise canvas positions [lo, end) in place until none of the `eligible` ones is masked (or the commit
    rule's passes, planned from the rows' masked `counts`, run out). `position` is what `choose` reads for each
    canvas index (min_new_tokens)."""
    span = slice(lo, end)  # everything outside is fixed for the block: predict and rank only inside
    for step in range(commit.passes(counts)):
        masked = (canvas[:, span] == mask_token_id) & eligible[:, span]
        if not masked.any():
            break
        tokens, probs, p_token = choose(denoiser(canvas, attention_mask, lo, end), position[..., span])
        chosen = commit(step, masked, rank(probs, p_token, masked), probs, p_token)
        canvas[:, span] = torch.where(chosen, tokens, canvas[:, span])
        out.record(masked, chosen, canvas)


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
