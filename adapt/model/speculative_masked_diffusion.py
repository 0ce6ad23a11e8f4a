# Written into every converted checkpoint as remote code: imports only torch and transformers.
"""Speculative decoding with the AR parent's exact output (REFERENCE §14: Uno, Leviathan et al. 2023).

One checkpoint holds two models over the same weights:

- the **parent**: the converted decoder run causally (`is_causal=True`, adapter off), which reproduces the source
  causal LM's logits exactly (invariant 1);
- the **drafter**: the same decoder in block-diffusion mode (`config.block_size`), with the drafter adapter on when
  the checkpoint has one (`DrafterAdapter`: LoRA on the decoder's projections plus a [MASK] embedding row, applied
  by hooks, so no peft is needed).

Each round the drafter fills K [MASK] tokens after the text in one pass, then the parent runs once, causally, over
the drafted tokens against its exact KV cache. Greedy: the longest prefix of drafts equal to the parent's argmax
is accepted, then the parent's own next token. Sampling: draft i is accepted with probability min(1, p/q), the
first rejected one replaced by a sample of the normalised residual max(0, p - q) (`acceptance`, `residual`), so the
output is distributed exactly as the parent's sampling with the same temperature, top-k and top-p
(`token_distribution`, transformers' order: temperature, then top-k, then top-p). Whatever the drafter proposes,
the output is the parent's: a bad drafter costs speed, never quality.

Both caches are `HoleyCache`s: a transformers cache plus the padding mask of its columns. Positions count real
columns, and attention goes through `cached_block_mask` (block size 1 for the parent: causal; the drafter's block
size for the drafter), which decides by position id, window included. A rolled-back entry is cropped when every
row rejected it, and otherwise becomes a hole (mask 0) that no query sees: rows of a batch accept different
counts, and each row computes exactly what it would alone.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from .block_masked_diffusion import cached_block_mask, check_block_implementation
from .sampling_masked_diffusion import SamplingError, SamplingOutput, Stream, _holes
from .transformers_compat import drop_last_cached, full_cache, select_cache_rows

PROJECTION_TYPES = ("Linear", "Conv1D")  # GPT-2 keeps its projections in transformers' Conv1D (weight in x out)
ROUTERS = ("gate", "router")  # MoE routers: a LoRA there would change which experts run, not what they compute


# ------------------------------------------------------------------------------------------------ the adapter

def drafter_targets(decoder) -> list[str]:
    """The names (last component) of the decoder's projections a drafter adapter acts on: every linear layer but
    the LM head and MoE routers."""
    head = decoder.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in decoder.named_modules()
             if type(module).__name__ in PROJECTION_TYPES and module is not head}
    return sorted(names - set(ROUTERS))


def _features(module) -> tuple[int, int]:
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


class LoraPair(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, dtype=None):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))


class DrafterAdapter(nn.Module):
    """The drafter's weights beside the untouched parent: per targeted projection W a LoRA pair (W x + s B A x,
    s = alpha / rank), and `mask_delta`, added to the input embedding at [MASK] tokens (after any embedding
    scale), the drafter's own [MASK] row. They act only inside `drafting(model)`, which attaches the hooks;
    outside it no hook is attached and the model is the parent, bit for bit. `spec` is `config.drafter`: {"rank", "alpha", "targets"}. B starts at zero, so an
    untrained adapter drafts as the block-diffusion conversion itself does."""

    def __init__(self, decoder, spec: dict, mask_token_id: int):
        super().__init__()
        rank, targets = int(spec["rank"]), set(spec["targets"])
        self.scale = float(spec["alpha"]) / rank
        self.mask_token_id = mask_token_id
        dtype = decoder.get_input_embeddings().weight.dtype
        self.lora = nn.ModuleDict()
        sites = []  # (decoder module, its hook): a plain list, so the decoder's modules are not registered twice
        for name, module in decoder.named_modules():
            if type(module).__name__ in PROJECTION_TYPES and name.rsplit(".", 1)[-1] in targets:
                key = name.replace(".", "__")
                self.lora[key] = LoraPair(*_features(module), rank, dtype)
                sites.append((module, self._lora_hook(key)))
        if not len(self.lora):
            raise ValueError(f"the drafter adapter's targets {sorted(targets)} match no projection of the decoder")
        hidden = decoder.get_input_embeddings().weight.shape[1]
        self.mask_delta = nn.Parameter(torch.zeros(hidden, dtype=dtype))
        sites.append((decoder.get_input_embeddings(), self._embedding_hook))
        self._sites, self._handles = sites, []

    def attach(self):
        """Hook the adapter into the decoder (idempotent). Detached, the decoder carries no trace of it."""
        if not self._handles:
            self._handles = [module.register_forward_hook(hook) for module, hook in self._sites]

    def detach(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset_parameters(self, generator: torch.Generator | None = None):
        """LoRA's start (as peft's): A uniform in +-1/sqrt(in) (Kaiming, a = sqrt(5)), B and the mask delta zero."""
        with torch.no_grad():
            for pair in self.lora.values():
                bound = 1 / math.sqrt(pair.A.shape[1])
                pair.A.copy_(torch.rand(pair.A.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound)
                pair.B.zero_()
            self.mask_delta.zero_()

    def _lora_hook(self, key):
        def hook(module, args, output):
            weights = self.lora[key]._parameters
            a, b = weights["A"], weights["B"]
            return output + ((args[0].to(a.dtype) @ a.T) @ b.T * self.scale).to(output.dtype)
        return hook

    def _embedding_hook(self, module, args, output):
        masked = (args[0] == self.mask_token_id)[..., None]
        return output + masked * self.mask_delta.to(output.dtype)


@contextlib.contextmanager
def drafting(model):
    """The drafter adapter on (if the model has one) for the forwards inside."""
    adapter = getattr(model, "drafter", None)
    if adapter is None:
        yield
        return
    adapter.attach()
    try:
        yield
    finally:
        adapter.detach()


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
        logits = logits.to(torch.float64, copy=True)
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
    q_next = torch.cat([q, torch.zeros_like(q[:, :1])], 1)  # residual(p, 0) = p
    return accepted, residual(p[rows, accepted], q_next[rows, accepted])


# ------------------------------------------------------------------------------------------------ caches

class HoleyCache:
    """A KV cache whose columns carry a padding mask: 1 a real token, 0 left padding or a rolled-back entry (a
    hole). Queries attend by `cached_block_mask`, positions counting real columns only, so a hole changes no
    output. `block_size` 1 is causal attention."""

    def __init__(self, model, batch: int, block_size: int, device):
        self.model, self.block_size = model, block_size
        self.kv = full_cache()
        self.mask = torch.zeros((batch, 0), dtype=torch.long, device=device)

    @property
    def real(self) -> torch.Tensor:
        return self.mask.sum(1)

    def forward(self, ids, mask, keep):
        """Run `ids` (batch, w) with padding `mask` after the cached columns; their keys/values are appended.
        Returns the logits at pass columns `keep`. The mask alone decides attention (the model's `is_causal`
        switch only matters where no mask is given), so nothing is toggled between the two models' passes."""
        full = torch.cat([self.mask, mask], 1)
        positions = (full.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]
        attention = cached_block_mask(self.model.config.text_config, full, positions, self.block_size,
                                      self.model.dtype)
        out = self.model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=self.kv,
                         use_cache=True, logits_to_keep=keep)
        self.mask = full
        return out.logits

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


def _left_padded(rows: list[list[int]], like: torch.Tensor):
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=like.dtype, device=like.device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=like.device)
    for r, row in enumerate(rows):
        if row:
            ids[r, width - len(row):] = torch.tensor(row, dtype=like.dtype)
            mask[r, width - len(row):] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------------ the loop

@dataclass
class SpeculativeOutput(SamplingOutput):
    draft_length: int = 0
    row_rounds: torch.LongTensor | None = None
    """Per row, the draft-and-verify rounds it took part in (two forwards each: `row_nfe`)."""
    row_accepted_at: torch.LongTensor | None = None
    """(batch, draft_length): per row, the rounds in which the parent accepted draft position i."""

    @property
    def acceptance(self) -> torch.Tensor:
        """(batch, draft_length): per row, the fraction of rounds in which draft position i was accepted."""
        return self.row_accepted_at.double() / self.row_rounds.clamp_min(1)[:, None]


def check_speculative(model, draft_length: int):
    block_size = getattr(model.config, "block_size", None)
    if block_size is None:
        raise SamplingError("speculative decoding needs a drafter: this checkpoint has no block size; convert the "
                            "causal source with --drafter --block-size K (or use a block-diffusion checkpoint)")
    if isinstance(draft_length, bool) or not isinstance(draft_length, int) or draft_length < 1:
        raise SamplingError(f"draft length must be at least 1, got {draft_length!r}")
    check_block_implementation(model.config.text_config)


def speculative_sample(model, input_ids: torch.LongTensor, *, max_new_tokens: int, draft_length: int | None = None,
                       attention_mask: torch.Tensor | None = None, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                       min_new_tokens: int = 0, max_positions: int | None = None,
                       generator: torch.Generator | None = None, streamer=None) -> SpeculativeOutput:
    """Decode `max_new_tokens` tokens after each (left-padded) prompt: the drafter proposes `draft_length` tokens
    (default: the block size) in one pass, the parent verifies them in one causal pass (module docstring). A row
    stops at its EOS (the rest of it becomes EOS) or after `max_new_tokens`; finished rows leave both caches.
    Every forward is counted: `nfe` (batch), `row_nfe` (two per round a row took part in), and per row the rounds
    and the acceptance per draft position. Returns (batch, prompt_len + max_new_tokens) in `.sequences`."""
    config = model.config
    k = config.block_size if draft_length is None else draft_length
    check_speculative(model, k)
    mask_id, shift, n = config.mask_token_id, int(config.shift), max_new_tokens
    if n < 1:
        raise SamplingError(f"speculative decoding makes new tokens: max_new_tokens must be at least 1, got {n}")
    if _holes(input_ids, mask_id, attention_mask).any():
        raise SamplingError("speculative decoding continues a prompt; it cannot fill holes ([MASK] tokens) in it: "
                            "infill without --speculative")
    batch, prompt_len = input_ids.shape
    if prompt_len == 0:
        raise SamplingError("the prompt needs at least one token (e.g. BOS)")
    if max_positions is not None and prompt_len + n + k - 1 > max_positions:
        raise SamplingError(f"prompt ({prompt_len}) + max_new_tokens ({n}) + draft length ({k}) - 1 exceeds the "
                            f"model's {max_positions} positions")
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    if not real[:, -1].all():
        raise SamplingError("pad prompts on the left (attention_mask 0 only before a row's tokens)")
    device = input_ids.device
    choice = TokenChoice(mask_id, temperature, top_k, top_p, eos_token_id, min_new_tokens, generator)
    stream = Stream(streamer, input_ids, eos_token_id)

    prompts = [input_ids[r][real[r]].tolist() for r in range(batch)]
    new = [[] for _ in range(batch)]
    rows = list(range(batch))  # the rows still decoding, in cache order
    parent = HoleyCache(model, batch, 1, device)
    drafter = HoleyCache(model, batch, config.block_size, device)
    parent_ids, parent_mask = input_ids, real.long()
    drafter_ids, drafter_mask = input_ids, real.long()
    out = SpeculativeOutput(sequences=input_ids, nfe=0, row_nfe=torch.zeros(batch, dtype=torch.long),
                            row_committed=torch.zeros(batch, dtype=torch.long), draft_length=k,
                            row_rounds=torch.zeros(batch, dtype=torch.long),
                            row_accepted_at=torch.zeros((batch, k), dtype=torch.long))
    while rows:
        b = len(rows)
        produced = torch.tensor([len(new[r]) for r in rows], device=device)
        # the index among the row's new tokens of the token each logit predicts: drafts 0..k-1, then the next
        new_index = produced[:, None] + torch.arange(k + 1, device=device)[None]

        # draft: k masks after each row's text, in one block-diffusion pass with the adapter on
        w = drafter_ids.shape[1]
        ids = torch.cat([drafter_ids, drafter_ids.new_full((b, k), mask_id)], 1)
        mask = torch.cat([drafter_mask, drafter_mask.new_ones((b, k))], 1)
        keep = torch.arange(w - shift, w + k - shift, device=device)  # with shift the logit before predicts
        total = drafter.real + drafter_mask.sum(1)  # the row's text, once this pass has run
        with drafting(model):
            draft_logits = drafter.forward(ids, mask, keep)
        drafts, q = choice.draft(draft_logits, new_index[:, :k])
        # keep the keys/values of whole blocks only: the text's last partial block saw the masks (and sees other
        # tokens next time), so it is run again; being right-aligned, it and the masks are trailing columns
        whole = total // config.block_size * config.block_size
        drafter.truncate(w + k, w - (total - whole))

        # verify: the parent, causally, over the drafts against its exact cache
        w = parent_ids.shape[1]
        ids = torch.cat([parent_ids, drafts], 1)
        mask = torch.cat([parent_mask, parent_mask.new_ones((b, k))], 1)
        verify_logits = parent.forward(ids, mask, torch.arange(w - 1, w + k, device=device))
        accepted, following = choice.verify(verify_logits, new_index, drafts, q)
        parent.truncate(k, accepted)  # drafts past the accepted ones: rolled back

        out.nfe += 2
        out.committed_per_step += [0, 0]
        still, parent_next = [], []
        for i, r in enumerate(rows):
            a = int(accepted[i])
            out.row_rounds[r] += 1
            out.row_nfe[r] += 2
            out.row_accepted_at[r, :a] += 1
            tokens = drafts[i, :a].tolist() + [int(following[i])]
            if eos_token_id is not None and eos_token_id in tokens:
                tokens = tokens[: tokens.index(eos_token_id) + 1]
            tokens = tokens[: n - len(new[r])]
            new[r] += tokens
            out.row_committed[r] += len(tokens)
            out.committed_per_step[-1] += len(tokens)
            if len(new[r]) < n and (eos_token_id is None or new[r][-1] != eos_token_id):
                still.append(i)
                parent_next.append([new[r][-1]])
        stream.final([torch.tensor(t, dtype=input_ids.dtype) for t in new] if streamer is not None else None)
        gone = stream.stopped(torch.zeros(batch, dtype=torch.bool))  # rows whose client left stop here
        parent_next = [t for i, t in zip(still, parent_next) if not gone[rows[i]]]
        still = [i for i in still if not gone[rows[i]]]
        if len(still) < b:
            keep_rows = torch.tensor(still, dtype=torch.long, device=device)
            parent.select(keep_rows)
            drafter.select(keep_rows)
            rows = [rows[i] for i in still]
        if not rows:
            break
        parent_ids, parent_mask = _left_padded(parent_next, input_ids)
        text = [prompts[r] + new[r] for r in rows]
        drafter_ids, drafter_mask = _left_padded([t[int(c):] for t, c in zip(text, drafter.real)], input_ids)
    stream.end()

    sequences = torch.full((batch, prompt_len + n), eos_token_id if eos_token_id is not None else mask_id,
                           dtype=input_ids.dtype, device=device)
    sequences[:, :prompt_len] = input_ids
    for r in range(batch):
        sequences[r, prompt_len: prompt_len + len(new[r])] = torch.tensor(new[r], dtype=input_ids.dtype)
    out.sequences = sequences
    return out


__all__ = ["DrafterAdapter", "HoleyCache", "SpeculativeOutput", "TokenChoice", "acceptance", "check_speculative",
           "drafter_targets", "drafting", "residual", "speculative_sample", "token_distribution", "verdict"]
