# Written into every converted checkpoint as remote code: imports only torch and transformers.
"""Speculative decoding with the AR parent's exact output (REFERENCE §14: Uno, TiDAR, Leviathan et al. 2023).

One checkpoint holds two models over the same weights: the **parent**, the converted decoder run causally with the
adapter off, which reproduces the source causal LM's logits exactly (invariant 1), and the **drafter**, the same
decoder with the gated drafter adapter on at [MASK] positions (`drafter_masked_diffusion`). Clean tokens are the
parent's everywhere, so there is one KV cache, the parent's, and each round is ONE forward (`fused_forward`):

- the clean tokens not yet cached, the last committed token y and the current drafts d1..dk, run causally: the
  parent's logits there verify d1..dk and give its own next token;
- in the same forward, for every acceptance length j = 0..k, a group of k + 1 masks after d_j (the first at the
  position of the parent's next token, which is not chosen yet) drafts the k tokens after that one (TiDAR: a partial
  acceptance wastes no pass). The group for the acceptance that happens supplies the next round's drafts.

With `guess_bonus` (the default), the same forward also guesses the parent's next token should it reject
d_{j+1} (j < k): the drafter's runner-up there; and, with shift, should it accept all k: the drafter's token after
d_k (the last mask of the group that drafted them). Each guess runs as a clean token (causal, adapter off) followed by a
group of k + 1 masks that only it and the text up to d_j precede. When the parent's token is the guess, the
parent's logits at the guess give the token after it as well (committed: one more token per round), and the
guess's group supplies the next drafts. Which logits are used depends only on committed tokens, so the output law
is unchanged.

The first round runs the prompt (prefill) with one group after it and no drafts. Greedy: the longest prefix of
drafts equal to the parent's argmax is accepted, then the parent's own next token. Sampling: draft i is accepted
with probability min(1, p/q), the first rejected one replaced by a sample of the normalised residual max(0, p - q)
(`acceptance`, `residual`), so the output is distributed exactly as the parent's sampling with the same
temperature, top-k and top-p (`token_distribution`, transformers' order: temperature, then top-k, then top-p).
Whatever the drafter proposes, the output is the parent's: a bad drafter costs speed, never quality.

The cache is a `HoleyCache`: a transformers cache plus the padding mask of its columns. Positions count real
columns. The masks' keys/values are dropped after the forward; a rejected draft's entry is cropped when every row
rejected it, and otherwise becomes a hole (mask 0) that no query sees: rows of a batch accept different counts, and
each row computes exactly what it would alone.
"""

import math
from dataclasses import dataclass

import torch

from .block_masked_diffusion import DENSE_IMPLEMENTATIONS, check_block_implementation
from .drafter_masked_diffusion import drafting, fused_forward
from .sampling_masked_diffusion import SamplingError, SamplingOutput, Stream, _holes
from .transformers_compat import drop_last_cached, full_cache, select_cache_rows


# ------------------------------------------------------------------------------------------------ the rule

def token_distribution(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                       top_p: float | None = None) -> torch.Tensor:
    """The sampling distribution (float64) of `generate(do_sample=True)` with these settings: logits divided by
    the temperature, then top-k (logits below the k-th largest dropped), then top-p (the smallest-probability
    tokens whose mass is at most 1 - top_p dropped, at least one kept), as transformers' warpers do, in order."""
    logits = logits.double() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        ascending, index = logits.sort(dim=-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, index, drop), -math.inf)
    return logits.softmax(-1)


def acceptance(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """min(1, p(x)/q(x)) for each drafted token x (drawn from q): the probability that speculative sampling keeps
    it. `p`, `q`: (..., V) distributions of the parent and the drafter; `drafts`: (...)."""
    pd, qd = p.gather(-1, drafts[..., None])[..., 0], q.gather(-1, drafts[..., None])[..., 0]
    return torch.where(qd > 0, (pd / qd.clamp_min(1e-300)).clamp(max=1.0), torch.ones_like(pd))


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The distribution a rejected draft is replaced from: max(0, p - q), normalised. A rejection happens only
    where p(x) < q(x), so its mass is positive whenever it is used."""
    r = (p - q).clamp_min(0.0)
    return r / r.sum(-1, keepdim=True).clamp_min(1e-300)


def _draw(probs: torch.Tensor, generator) -> torch.Tensor:
    """One token per distribution (inverse CDF, float64)."""
    u = torch.rand(probs.shape[:-1] + (1,), dtype=torch.float64, device=probs.device, generator=generator)
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[..., -1:]).clamp(max=probs.shape[-1] - 1)[..., 0]


@dataclass
class TokenChoice:
    """The parent's and the drafter's token rule: the [MASK] token is never produced (a converted checkpoint's
    [MASK] is not a token of the parent), EOS not before `min_new_tokens`; temperature 0 is greedy."""
    mask_token_id: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: int | None = None
    min_new_tokens: int = 0
    generator: torch.Generator | None = None

    def logits(self, logits, new_index):
        """`new_index` (batch, n): the index among the row's new tokens of the token each logit predicts."""
        # greedy keeps the logits' dtype: the argmax is the same, the copy cheaper
        logits = logits.to(torch.float64 if self.temperature else logits.dtype, copy=True)
        logits[..., self.mask_token_id] = -math.inf
        if self.eos_token_id is not None and self.min_new_tokens:
            logits[..., self.eos_token_id] = logits[..., self.eos_token_id].masked_fill(
                new_index < self.min_new_tokens, -math.inf)
        return logits

    def distribution(self, logits, new_index):
        return token_distribution(self.logits(logits, new_index), self.temperature, self.top_k, self.top_p)

    def draft(self, logits, new_index):
        """Drafted tokens and the distribution q they were drawn from (None when greedy)."""
        if self.temperature == 0:
            return self.logits(logits, new_index).argmax(-1), None
        q = self.distribution(logits, new_index)
        return _draw(q, self.generator), q

    def pick(self, logits, new_index):
        """The parent's token from its `logits` (greedy: the argmax; sampling: a draw)."""
        if self.temperature == 0:
            return self.logits(logits, new_index).argmax(-1)
        return _draw(self.distribution(logits, new_index), self.generator)

    def guesses(self, logits, new_index, drafts):
        """The guesses of the parent's own token after each count of accepted drafts: per draft, the drafter's
        likeliest other token (greedy rejects a draft only for another argmax; sampling's residual has no mass on
        it), and, when `logits` has one position more than `drafts`, the drafter's likeliest token there (should
        the parent accept every draft)."""
        k, scores = drafts.shape[1], self.logits(logits, new_index[:, :logits.shape[1]])
        runner_up = scores[:, :k].scatter(-1, drafts[..., None], -math.inf).argmax(-1)
        return torch.cat([runner_up, scores[:, k:].argmax(-1)], 1)

    def verify(self, logits, new_index, drafts, q):
        """Per row, how many drafts the parent accepts (a, leading) and the token after them: the parent's own
        (greedy: its argmax; sampling: a draw of the residual at the first rejection, else of p after the last
        draft). `logits`: (batch, k + 1, V), the parent's at the k drafts' positions and after."""
        k = drafts.shape[1]
        rows = torch.arange(len(drafts), device=drafts.device)
        if self.temperature == 0:
            best = self.logits(logits, new_index).argmax(-1)
            accepted = (drafts == best[:, :k]).long().cumprod(1).sum(1)
            return accepted, best[rows, accepted]
        p = self.distribution(logits, new_index)
        u = torch.rand(drafts.shape, dtype=torch.float64, device=drafts.device, generator=self.generator)
        accepted, following = verdict(p, q, drafts, u)
        return accepted, _draw(following, self.generator)


def verdict(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u: torch.Tensor):
    """Speculative sampling's decision for one round, given its uniform draws `u` (batch, k): draft i (drawn from
    q[:, i]) stands if u_i < min(1, p/q) and every draft before it stands. Returns per row the number accepted, a,
    and the distribution of the token after them: the residual of p and q at the first rejection, p itself after
    the last draft. `p`: (batch, k + 1, V), the parent's at the drafts' positions and after; `q`: (batch, k, V)."""
    k = drafts.shape[1]
    rows = torch.arange(len(drafts), device=drafts.device)
    accepted = (u < acceptance(p[:, :k], q, drafts)).long().cumprod(1).sum(1)
    q_next = torch.cat([q, torch.zeros_like(p[:, :1])], 1)  # residual(p, 0) = p
    return accepted, residual(p[rows, accepted], q_next[rows, accepted])


# ------------------------------------------------------------------------------------------------ the cache

class HoleyCache:
    """The parent's KV cache, whose columns carry a padding mask: 1 a real token, 0 left padding or a rolled-back
    entry (a hole). Queries attend by position id (`draft_attention_mask`), positions counting real columns only,
    so a hole changes no output."""

    def __init__(self, batch: int, device):
        self.kv = full_cache()
        self.mask = torch.zeros((batch, 0), dtype=torch.long, device=device)

    def truncate(self, trailing: int, kept: torch.Tensor):
        """Of the last `trailing` columns, row r keeps its first `kept[r]`: columns no row keeps are removed from
        the cache (exactly: the cache is as if they had never run), the others become holes in the rows that drop
        them."""
        drop = trailing - int(kept.max()) if len(kept) else trailing
        drop_last_cached(self.kv, drop)
        self.mask = self.mask[:, : self.mask.shape[1] - drop]
        width = trailing - drop
        if width:
            column = torch.arange(width, device=kept.device)
            self.mask[:, -width:] *= (column[None] < kept[:, None]).long()

    def select(self, rows: torch.Tensor):
        select_cache_rows(self.kv, rows)
        self.mask = self.mask[rows]


# ------------------------------------------------------------------------------------------------ the loop

@dataclass
class SpeculativeOutput(SamplingOutput):
    draft_length: int = 0
    row_rounds: torch.LongTensor | None = None
    """Per row, the rounds that verified its drafts: every forward it took part in but the first (the prompt's
    prefill, which only drafts). `row_nfe` counts them all: one forward per round."""
    row_accepted_at: torch.LongTensor | None = None
    """(batch, draft_length): per row, the rounds in which the parent accepted draft position i."""
    row_guessed: torch.LongTensor | None = None
    """Per row, the rounds in which the parent's own token was the guess (`guess_bonus`): each committed one token
    more, the parent's next one, from the same forward."""

    @property
    def acceptance(self) -> torch.Tensor:
        """(batch, draft_length): per row, the fraction of verifying rounds in which draft position i was
        accepted."""
        return self.row_accepted_at.double() / self.row_rounds.clamp_min(1)[:, None]


def check_speculative(model, draft_length: int):
    # Without a drafter the verifier would be the checkpoint's own causal mode, which is its source model only
    # until it is trained: the text would not be the parent's, whatever the README promises.
    if getattr(model.config, "drafter", None) is None:
        raise SamplingError("speculative decoding needs a drafter, and this checkpoint has none; convert the causal "
                            "source with --drafter --block-size K (or train one: recipes/adaptation/*-drafter.yaml)")
    if isinstance(draft_length, bool) or not isinstance(draft_length, int) or draft_length < 1:
        raise SamplingError(f"draft length must be at least 1, got {draft_length!r}")
    check_block_implementation(model.config.text_config, DENSE_IMPLEMENTATIONS)  # the fused round's mask is dense


@dataclass
class _Round:
    """What one fused round decided, per row: the drafts accepted, the parent's own next token, whether it was
    the guess (then `extra`, the parent's token after it, is committed too), and the next drafts (their
    distribution `q`, None when greedy) with the next round's guesses (None: guessing off)."""
    accepted: torch.Tensor
    following: torch.Tensor
    hit: torch.Tensor
    extra: torch.Tensor
    drafts: torch.Tensor
    q: torch.Tensor | None
    guesses: torch.Tensor | None


def _round(model, cache, clean_ids, clean_mask, drafts, q, guesses, choice, produced, k) -> _Round:
    """One fused forward: verify `drafts` (drawn from `q`; None when greedy), draft the next k. With `guesses`
    (batch, d or d + 1), guess i is the parent's next token should it accept i drafts: a group drafts after it
    too, and when the parent's token is the guess, the parent's logits at the guess give the token after it."""
    b, d = drafts.shape
    ids = torch.cat([clean_ids, drafts], 1)
    mask = None if clean_mask is None else torch.cat([clean_mask, clean_mask.new_ones((b, d))], 1)
    out = fused_forward(model, cache, ids, mask, d, k, guesses)
    verify_logits = out[0]
    steps, rows = torch.arange(d + 1, device=ids.device), torch.arange(b, device=ids.device)
    if choice.temperature != 0 and q is None:  # the prefill round verifies nothing
        q = torch.zeros((b, 0, verify_logits.shape[-1]), dtype=torch.float64, device=ids.device)
    accepted, following = choice.verify(verify_logits, produced[:, None] + steps, drafts, q)
    cache.truncate(d, accepted)  # drafts past the accepted ones: rolled back
    chosen = out[1][rows, accepted]  # the group after the last accepted draft (and its logit after the drafts)
    hit, extra = torch.zeros_like(accepted, dtype=torch.bool), following
    if guesses is not None and guesses.shape[1]:  # the prefill has no guesses
        at = accepted.clamp(max=guesses.shape[1] - 1)  # without shift there is no guess after the last draft
        hit = (accepted < guesses.shape[1]) & (guesses[rows, at] == following)
        extra = choice.pick(out[2][rows, at], produced + accepted + 1)
        chosen = torch.where(hit[:, None, None], out[3][rows, at], chosen)
    new_index = (produced + accepted + 1 + hit.long())[:, None] + torch.arange(k + 1, device=ids.device)
    drafts, q = choice.draft(chosen[:, :k], new_index[:, :k])
    return _Round(accepted, following, hit, extra, drafts, q,
                  None if guesses is None else choice.guesses(chosen, new_index, drafts))


def _commit(out, step: _Round, rows, drafts, new, n: int, eos_token_id) -> list[int]:
    """Append each row's tokens of this round (accepted drafts, the parent's token, and the one after a right
    guess; up to EOS and `n`) and count them. Returns the indices (among `rows`) of the rows still decoding."""
    verified, still = drafts.shape[1] > 0, []
    out.committed_per_step.append(0)
    for i, (r, a, y, hit, extra, proposed) in enumerate(zip(rows, step.accepted.tolist(), step.following.tolist(),
                                                            step.hit.tolist(), step.extra.tolist(), drafts.tolist())):
        out.row_nfe[r] += 1
        out.row_rounds[r] += verified
        out.row_accepted_at[r, :a] += 1
        out.row_guessed[r] += hit
        tokens = proposed[:a] + [y] + ([extra] if hit else [])
        if eos_token_id is not None and eos_token_id in tokens:
            tokens = tokens[: tokens.index(eos_token_id) + 1]
        tokens = tokens[: n - len(new[r])]
        new[r] += tokens
        out.row_committed[r] += len(tokens)
        out.committed_per_step[-1] += len(tokens)
        if len(new[r]) < n and (eos_token_id is None or new[r][-1] != eos_token_id):
            still.append(i)
    return still


def _uncached(step: _Round):
    """The next round's clean tokens (not in the cache yet): the parent's token, and after a right guess the token
    after it; rows without one get a padding column before theirs (a hole). Returns (ids, padding mask or None)."""
    if not bool(step.hit.any()):
        return step.following[:, None], None
    ids = torch.stack([step.following, torch.where(step.hit, step.extra, step.following)], 1)
    return ids, torch.stack([step.hit.long(), torch.ones_like(step.following)], 1)


def speculative_sample(model, input_ids: torch.LongTensor, *, max_new_tokens: int, draft_length: int | None = None,
                       attention_mask: torch.Tensor | None = None, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                       min_new_tokens: int = 0, max_positions: int | None = None,
                       generator: torch.Generator | None = None, streamer=None,
                       guess_bonus: bool = True) -> SpeculativeOutput:
    """Decode `max_new_tokens` tokens after each (left-padded) prompt, `draft_length` (default: the block size)
    drafted per round and verified by the parent in the next, one forward per round (module docstring). A row
    stops at its EOS (the rest of it becomes EOS) or after `max_new_tokens`; finished rows leave the cache. Every
    forward is counted: `nfe` (batch), `row_nfe` (the forwards a row took part in: its rounds, prefill included),
    per row the verifying rounds and the acceptance per draft position. Returns (batch, prompt_len +
    max_new_tokens) in `.sequences`."""
    config = model.config
    k = config.block_size if draft_length is None else draft_length
    check_speculative(model, k)
    mask_id, n = config.mask_token_id, max_new_tokens
    if n < 1:
        raise SamplingError(f"speculative decoding makes new tokens: max_new_tokens must be at least 1, got {n}")
    if _holes(input_ids, mask_id, attention_mask).any():
        raise SamplingError("speculative decoding continues a prompt; it cannot fill holes ([MASK] tokens) in it: "
                            "infill without --speculative")
    batch, prompt_len = input_ids.shape
    if prompt_len == 0:
        raise SamplingError("the prompt needs at least one token (e.g. BOS)")
    reach = 2 * k + 1 + bool(guess_bonus)  # a guess's group stands one position further on
    if max_positions is not None and prompt_len + n + reach - 1 > max_positions:
        raise SamplingError(f"prompt ({prompt_len}) + max_new_tokens ({n}) + {reach - 1} exceeds the model's "
                            f"{max_positions} positions (a round drafts up to {reach} positions ahead at draft length "
                            f"{k}{', guessing' if guess_bonus else ''})")
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    if not real[:, -1].all():
        raise SamplingError("pad prompts on the left (attention_mask 0 only before a row's tokens)")
    device = input_ids.device
    choice = TokenChoice(mask_id, temperature, top_k, top_p, eos_token_id, min_new_tokens, generator)
    stream = Stream(streamer, input_ids, eos_token_id)
    new = [[] for _ in range(batch)]
    rows = list(range(batch))  # the rows still decoding, in cache order
    cache = HoleyCache(batch, device)
    clean_ids, clean_mask = input_ids, None if real.all() else real.long()  # None: no padding
    drafts, q = input_ids.new_zeros((batch, 0)), None
    out = SpeculativeOutput(sequences=input_ids, nfe=0, row_nfe=torch.zeros(batch, dtype=torch.long),
                            row_committed=torch.zeros(batch, dtype=torch.long), draft_length=k,
                            row_rounds=torch.zeros(batch, dtype=torch.long),
                            row_accepted_at=torch.zeros((batch, k), dtype=torch.long),
                            row_guessed=torch.zeros(batch, dtype=torch.long))
    guesses = input_ids.new_zeros((batch, 0)) if guess_bonus else None
    with drafting(model):  # the hooks stay attached for the whole loop; each forward gates its own masks
        while rows:
            produced = torch.tensor([len(new[r]) for r in rows], device=device)
            step = _round(model, cache, clean_ids, clean_mask, drafts, q, guesses, choice, produced, k)
            out.nfe += 1
            still = _commit(out, step, rows, drafts, new, n, eos_token_id)
            if streamer is not None:
                stream.final([torch.tensor(t, dtype=input_ids.dtype) for t in new])
                gone = stream.stopped(torch.zeros(batch, dtype=torch.bool))  # rows whose client left stop here
                still = [i for i in still if not gone[rows[i]]]
            clean_ids, clean_mask = _uncached(step)
            drafts, q, guesses = step.drafts, step.q, step.guesses
            if len(still) < len(rows):
                keep = torch.tensor(still, dtype=torch.long, device=device)
                cache.select(keep)
                rows = [rows[i] for i in still]
                clean_ids, drafts = clean_ids[keep], drafts[keep]
                clean_mask = None if clean_mask is None or bool(clean_mask[keep].all()) else clean_mask[keep]
                q, guesses = (None if t is None else t[keep] for t in (q, guesses))
    stream.end()

    sequences = torch.full((batch, prompt_len + n), eos_token_id if eos_token_id is not None else mask_id,
                           dtype=input_ids.dtype, device=device)
    sequences[:, :prompt_len] = input_ids
    for r in range(batch):
        sequences[r, prompt_len: prompt_len + len(new[r])] = torch.tensor(new[r], dtype=input_ids.dtype)
    out.sequences = sequences
    return out


__all__ = ["HoleyCache", "SpeculativeOutput", "TokenChoice", "acceptance", "check_speculative", "residual",
           "speculative_sample", "token_distribution", "verdict"]
