# Written into every converted checkpoint as remote code: imports only torch and transformers.
"""The drafter that reads the parent's cache (REFERENCE §14: Uno's conditional LoRA, TiDAR's fused forward).

A drafter checkpoint holds the parent (the converted decoder run causally, which is the source causal LM exactly)
and a `DrafterAdapter`: LoRA pairs on the decoder's projections and a [MASK] embedding row. The adapter is
**gated**: it acts only at [MASK] positions. Clean tokens therefore compute exactly what the parent computes, and
attend causally, so their keys/values are the parent's: the parent's KV cache is the only cache, and one forward
can hold both the parent's causal stream and groups of masks that draft.

The layout of such a forward (`draft_attention_mask`, the one rule for decoding and training):

- clean columns (group -1) attend causally to clean columns (by position id; padding and rolled-back columns are
  never seen), never to a mask;
- a group of k + 1 masks (group g >= 0) attends to the clean columns up to its *limit* position (the last clean
  token it drafts after) and bidirectionally to its own group, never to another group; its masks stand at the
  positions limit + 1, ..., limit + k + 1;
- a guess column (group -2 - g, decoding's `guess_bonus`) is a clean token at limit + 1 that attends as clean
  columns do (up to its limit, and itself) and is seen only by group g, whose masks then stand one further on.

What a group drafts. After the clean text ending at position `limit`, the next token (at limit + 1) is the parent's
own (its logit there is already in the clean stream), but in a fused round it is not yet chosen when the group
runs. So the group's first mask stands at that token's position, and the group drafts the k tokens after it, at
positions cut + i (i < k, cut = limit + 2): with shift (logit j - 1 predicts token j) from its masks 0..k-1,
without shift from its masks 1..k. `group_logit_index` says which; decoding (`fused_forward`) and training
(`drafter_training_logits`) both read it, so they agree by construction.

Sliding-window layers keep their window: a clean key is visible if pos_q - pos_k < window (the causal model's),
a key of the query's own group if |pos_q - pos_k| <= window (block diffusion's rule inside a block).
"""

import contextlib
import functools
import math

import torch
from torch import nn

from .block_masked_diffusion import _per_layer_kind, position_ids_from_padding
from .transformers_compat import checkpointing_drops_cache, drop_last_cached, full_cache

PROJECTION_TYPES = ("Linear", "Conv1D")  # GPT-2 keeps its projections in transformers' Conv1D (weight in x out)
ROUTERS = ("gate", "router")  # MoE routers: a LoRA there would change which experts run, not what they compute
# `config.drafter["reads"]`: what the drafter's masks attend to. "parent_cache": the clean context computed causally
# by the parent (one cache). dlm-adapt 0.5.1 wrote no such field: its drafters read their own block-causal cache, but
# every one it wrote is untrained (LoRA B and the [MASK] row zero): nothing in it was learned for that layout, so it
# runs here as an untrained drafter of this design (and the text is the parent's either way).
DESIGN = "parent_cache"


class DrafterError(ValueError):
    pass


def check_drafter_spec(spec: dict):
    reads = spec.get("reads", DESIGN)
    if reads != DESIGN:
        raise DrafterError(f"this checkpoint's drafter reads '{reads}', a design this code does not run (it runs "
                           f"'{DESIGN}'): pip install -U dlm-adapt && dlm-adapt upgrade CHECKPOINT_DIR, or convert "
                           f"the source again with --drafter")


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
    s = alpha / rank), and `mask_delta`, added to the input embedding (after any embedding scale), the drafter's
    own [MASK] row. Both act only at gated positions, and only inside `acting()` (or `drafting(model)`), which
    attaches the hooks; outside it no hook is attached and the model is the parent, bit for bit. `spec` is
    `config.drafter`: {"rank", "alpha", "targets", "reads"}. B starts at zero, so an untrained adapter drafts as
    the conversion itself does.

    The gate: with `acting(start)`, the columns from `start` on (the layouts here put every mask after the clean
    columns, so a slice does it); with `acting()`, the columns whose input id is [MASK]."""

    def __init__(self, decoder, spec: dict, mask_token_id: int):
        super().__init__()
        check_drafter_spec(spec)
        rank, targets = int(spec["rank"]), set(spec["targets"])
        self.scale = float(spec["alpha"]) / rank
        self.mask_token_id = mask_token_id
        dtype = decoder.get_input_embeddings().weight.dtype
        self.lora = nn.ModuleDict()
        sites = []  # (decoder module, its hook): a plain list, so the decoder's modules are not registered twice
        for name, module in decoder.named_modules():
            # experts see a routed subset of the tokens, which no per-position gate can follow
            if (type(module).__name__ in PROJECTION_TYPES and name.rsplit(".", 1)[-1] in targets
                    and ".experts." not in f".{name}."):
                key = name.replace(".", "__")
                self.lora[key] = LoraPair(*_features(module), rank, dtype)
                sites.append((module, self._lora_hook(key)))
        if not len(self.lora):
            raise ValueError(f"the drafter adapter's targets {sorted(targets)} match no projection of the decoder")
        hidden = decoder.get_input_embeddings().weight.shape[1]
        self.mask_delta = nn.Parameter(torch.zeros(hidden, dtype=dtype))
        sites.append((decoder.get_input_embeddings(), self._embedding_hook))
        self._sites, self._handles = sites, []
        self._start = self._gate = None  # the gate of the forward under way: a column (int) or (batch, seq, 1)
        self._frozen = {}  # without gradients: per projection, prepared once per `acting` (`_freeze`)
        self._shared = (None, None, None, None)  # (input, siblings' A^T, their product, input version)

    @contextlib.contextmanager
    def acting(self, start: int | None = None):
        """The adapter on for the forwards inside, at columns >= `start` (None: at [MASK] input ids)."""
        nested = bool(self._handles)
        if not nested:
            self._handles = [module.register_forward_hook(hook) for module, hook in self._sites]
            if not torch.is_grad_enabled():  # decoding: the weights stay as they are while the hooks run
                self._frozen = self._freeze()
        previous, self._start = self._start, start
        try:
            yield
        finally:
            self._start = previous
            if not nested:  # an outer `acting` keeps the last gate: a backward inside it recomputes with it
                self._gate, self._frozen, self._shared = None, {}, (None, None, None, None)
                for handle in self._handles:
                    handle.remove()
                self._handles = []

    def _freeze(self) -> dict:
        """Per projection (A^T of its siblings', its columns there, s B^T): projections of one module with one input
        width (q, k, v, o; gate, up) often read one input, whose product with all their A's is then one matmul
        (`_lora_hook` reuses it when the input is the very same tensor)."""
        siblings = {}
        for key in self.lora:
            siblings.setdefault((key.rpartition("__")[0], self.lora[key].A.shape[1]), []).append(key)
        frozen = {}
        for keys in siblings.values():
            at = torch.cat([self.lora[key].A.T for key in keys], 1).contiguous()
            rank = self.lora[keys[0]].A.shape[0]
            for i, key in enumerate(keys):
                frozen[key] = (at, i * rank, (i + 1) * rank, (self.lora[key].B * self.scale).T.contiguous())
        return frozen

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
            gate = self._gate
            if gate is None:
                return output
            x = args[0]
            if x.dim() != 3:
                raise ValueError(f"the drafter's gate needs (batch, seq, features) inputs; {key} got {tuple(x.shape)}")
            frozen = self._frozen.get(key)
            if (isinstance(gate, int) and frozen is not None and x.dtype == output.dtype == frozen[0].dtype
                    and not torch.is_grad_enabled()):  # decoding's path: the fewest operations per projection
                at, lo, hi, bt = frozen
                shared = self._shared  # a sibling's product serves if its input is this very tensor, unchanged
                if shared[0] is not x or shared[1] is not at or shared[3] != x._version:
                    self._shared = shared = (x, at, x[0, gate:] @ at if x.shape[0] == 1 else x[:, gate:] @ at,
                                             x._version)
                xa = shared[2][..., lo:hi]
                if x.shape[0] == 1:
                    output[0, gate:].addmm_(xa, bt)
                else:
                    output[:, gate:] += xa @ bt
                return output
            weights = self.lora[key]._parameters
            a, b = weights["A"], weights["B"]
            if isinstance(gate, int):  # the masks are the trailing columns
                delta = ((x[:, gate:].to(a.dtype) @ a.T) @ b.T * self.scale).to(output.dtype)
                if torch.is_grad_enabled():
                    return torch.cat([output[:, :gate], output[:, gate:] + delta], 1)
                output[:, gate:] += delta
                return output
            return output + (((x.to(a.dtype) @ a.T) @ b.T * self.scale) * gate).to(output.dtype)
        return hook

    def _embedding_hook(self, module, args, output):
        self._shared = (None, None, None, None)  # a new forward
        if self._start is not None:
            self._gate = self._start if self._start < output.shape[1] else None
            if self._gate is None:
                return output
            delta = self.mask_delta.to(output.dtype)
            if torch.is_grad_enabled():
                return torch.cat([output[:, :self._start], output[:, self._start:] + delta], 1)
            output[:, self._start:] += delta
            return output
        masked = (args[0] == self.mask_token_id)[..., None]
        self._gate = masked.to(self.mask_delta.dtype) if bool(masked.any()) else None
        return output if self._gate is None else output + masked * self.mask_delta.to(output.dtype)


@contextlib.contextmanager
def drafting(model, start: int | None = None):
    """The drafter adapter on (if the model has one) for the forwards inside: at columns >= `start`, or (None) at
    [MASK] input ids."""
    adapter = getattr(model, "drafter", None)
    if adapter is None:
        yield
        return
    with adapter.acting(start):
        yield


# ------------------------------------------------------------------------------------------------ the layout

def group_logit_index(draft_length: int, shift: bool) -> torch.Tensor:
    """Which of a group's k + 1 masks gives the logit of draft i (the token at cut + i, i < k): with shift the mask
    before it (masks 0..k-1), without shift its own (masks 1..k). The group's first mask stands at cut - 1, the
    parent's own next token, which the group does not know."""
    return torch.arange(draft_length) + 1 - int(shift)


def _seen(real, positions, groups, limits, queries: int, window):
    """`draft_attention_mask`'s rule as a boolean (batch, queries, K): True where a query sees a key."""
    kv = real.shape[1]
    kp, kg = positions[:, None, :], groups[:, None, :]
    qp, qg, ql = positions[:, kv - queries:, None], groups[:, kv - queries:, None], limits[:, kv - queries:, None]
    clean = (kg == -1) & (kp <= ql) & real.bool()[:, None, :]
    own = (kg >= 0) & (kg == qg)
    guess = (kg <= -2) & (kg == -2 - qg)  # a guess column (group -2 - g): seen by group g's masks
    if window is not None:
        distance = qp - kp
        clean, own, guess = clean & (distance < window), own & (distance.abs() <= window), guess & (distance < window)
    keys = torch.arange(kv, device=real.device)
    return clean | own | guess | (keys == keys[kv - queries:, None])


def _as_mask(seen, text_config, dtype):
    if text_config._attn_implementation == "sdpa":
        return seen[:, None]
    additive = torch.zeros(seen.shape, dtype=dtype, device=seen.device)  # eager adds the mask to its scores
    return additive.masked_fill(~seen, torch.finfo(dtype).min)[:, None]


def draft_attention_mask(text_config, real, positions, groups, limits, queries: int, dtype):
    """The attention mask of a forward of clean columns and groups of masks (module docstring). Per key column,
    (batch, K) or (1, K): `real` (0: padding or a rolled-back column), `positions`, `groups` (-1 clean, g >= 0 the
    g-th group of masks), `limits` (a clean column: its own position; a mask: the last clean position its group
    sees). The last `queries` columns are the forward's queries. A padding query sees itself (no empty row)."""
    return _per_layer_kind(text_config, lambda window: _as_mask(
        _seen(real, positions, groups, limits, queries, window), text_config, dtype))


def _mask_columns(limits, draft_length: int):
    """Positions, groups and limits of the masks of groups after the clean positions `limits` (batch, G), flat."""
    batch, g = limits.shape
    m = draft_length + 1
    offsets = torch.arange(1, m + 1, device=limits.device)
    positions = (limits[:, :, None] + offsets).reshape(batch, g * m)
    groups = torch.arange(g, device=limits.device).repeat_interleave(m)[None].expand(batch, -1)
    return positions, groups, limits.repeat_interleave(m, dim=1)


class _RoundLayout:
    """What a fused round of w clean columns, `guessed` guess columns and g + `guessed` groups of k + 1 masks
    computes from its shape alone, once: per non-clean column its anchor (which of the last g clean columns it
    follows) and position offset, the logits kept, the groups, and the attention among its own columns when none is
    padding (positions relative to the first clean one), per window. Columns: clean, guesses, the g groups (group j
    after the clean column j of the last g), the guess groups (group g + j after guess j, one position further).
    Decoding's rounds after the first take a few shapes."""

    def __init__(self, w: int, g: int, k: int, shift: bool, guessed: int | None, device):
        guessing, guessed = guessed is not None, guessed or 0
        m, count = k + 1, g + guessed
        group_anchor = torch.cat([torch.arange(g), torch.arange(guessed)]).to(device)
        self.anchor = torch.cat([torch.arange(guessed, device=device), group_anchor.repeat_interleave(m)])
        further = (torch.arange(count, device=device) >= g).long().repeat_interleave(m)
        self.offsets = torch.cat([torch.ones(guessed, dtype=torch.long, device=device),
                                  torch.arange(1, m + 1, device=device).repeat(count) + further])
        clean = torch.arange(w, device=device)
        self.groups = torch.cat([torch.full((w,), -1, device=device), -2 - (g + torch.arange(guessed, device=device)),
                                 torch.arange(count, device=device).repeat_interleave(m)])[None]
        self.limits = torch.cat([clean, w - g + self.anchor])[None]
        self.positions = torch.cat([clean, w - g + self.anchor + self.offsets])[None]
        index = group_logit_index(k, shift).to(device)
        if shift and guessing:  # mask k's logit: the token after the last draft, the parent's should it accept all
            index = torch.cat([index, index.new_tensor([k])])
        start = w + guessed
        self.keep = torch.cat([clean[w - g:], torch.arange(w, start, device=device),
                               (start + torch.arange(count, device=device)[:, None] * m + index).flatten()])
        self._own = {}

    def own(self, window):
        if window not in self._own:
            q = self.positions.shape[1]
            self._own[window] = _seen(torch.ones_like(self.positions), self.positions, self.groups, self.limits, q,
                                      window)
        return self._own[window]


@functools.lru_cache(maxsize=32)
def _round_layout(w: int, g: int, k: int, shift: bool, guessed: int | None, device: str) -> _RoundLayout:
    return _RoundLayout(w, g, k, shift, guessed, torch.device(device))


def fused_forward(model, cache, clean_ids, clean_mask, drafted: int, draft_length: int, guesses=None):
    """One fused round over the parent's `cache` (a `HoleyCache`: keys/values of the text so far and their
    padding mask): the clean tokens not yet cached, `clean_ids` (batch, w) with padding `clean_mask` (None: none),
    run causally (the parent; their keys/values are appended), and after the clean column of each of the last
    `drafted` + 1 clean tokens a group of `draft_length` + 1 masks (the drafter). Returns the parent's logits at
    those `drafted` + 1 columns (batch, drafted + 1, V) and each group's drafts' logits (batch, drafted + 1, k, V).
    The cache keeps the clean columns (the caller rolls back rejected drafts); the masks' keys/values never stay.

    `guesses` (batch, j): guessed tokens, guess i standing after the clean column i of those drafted + 1, run as
    the parent does (causal, adapter off) but seen only by a group of masks of its own after it. Then two more are
    returned, the parent's logits at each guess (the token after it) and its group's drafts' logits, and with
    shift every group's logits hold one more, after the k drafts': the drafter's for the token after the last."""
    guessed = 0 if guesses is None else guesses.shape[1]
    k, m, (batch, w), g = draft_length, draft_length + 1, clean_ids.shape, drafted + 1
    layout = _round_layout(w, g, k, bool(model.config.shift), None if guesses is None else guessed,
                           str(clean_ids.device))
    cached = cache.mask.shape[1]
    real = torch.cat([cache.mask, clean_mask if clean_mask is not None else cache.mask.new_ones((batch, w))], 1)
    positions = position_ids_from_padding(real)
    anchors = positions[:, cached + w - g:][:, layout.anchor]
    all_positions = torch.cat([positions, anchors + layout.offsets], 1)
    text_config, queries = model.config.text_config, layout.positions.shape[1]
    if clean_mask is None:  # the round's own columns: the layout's; the cache: every real column (in the window)
        query_positions = all_positions[:, cached:, None]

        def build(window):
            seen = cache.mask.bool()[:, None, :].expand(batch, queries, cached)
            if window is not None:
                seen = seen & (query_positions - positions[:, None, :cached] < window)
            return _as_mask(torch.cat([seen, layout.own(window).expand(batch, -1, -1)], 2), text_config, model.dtype)

        attention = _per_layer_kind(text_config, build)
    else:
        groups = torch.cat([torch.full((1, cached), -1, dtype=torch.long, device=real.device), layout.groups], 1)
        attention = draft_attention_mask(
            text_config, torch.cat([real, real.new_ones((batch, queries - w))], 1), all_positions,
            groups.expand(batch, -1), torch.cat([positions, anchors], 1), queries, model.dtype)
    masks = clean_ids.new_full((batch, (g + guessed) * m), model.config.mask_token_id)
    ids = torch.cat([clean_ids, masks] if guesses is None else [clean_ids, guesses, masks], 1)
    with drafting(model, start=w + guessed):
        logits = model(input_ids=ids, attention_mask=attention, position_ids=all_positions[:, cached:],
                       past_key_values=cache.kv, use_cache=True, logits_to_keep=layout.keep).logits
    drop_last_cached(cache.kv, queries - w)
    cache.mask = real
    drafts = logits[:, g + guessed:].unflatten(1, (g + guessed, -1))
    if guesses is None:
        return logits[:, :g], drafts
    return logits[:, :g], drafts[:, :g], logits[:, g:g + guessed], drafts[:, g:]


def drafter_training_logits(model, input_ids, attention_mask, cuts, draft_length: int, *, forward=None):
    """The training view of the fused round over the clean sequences `input_ids` (batch, L) (padding
    `attention_mask`, left, right or none; positions count real tokens), run causally with the adapter off, and G
    groups of `draft_length` + 1 masks per row, the adapter on, with the attention of decoding
    (`draft_attention_mask`). `cuts` (batch, G): group g of row r drafts the tokens at positions cut, ...,
    cut + k - 1 given the tokens before cut - 1 (the token at cut - 1 is the parent's own next token, which a fused
    round has not chosen yet: the group's first mask stands there). Needs 2 <= cut <= length - k per row.

    As in decoding, the clean tokens run first, without gradients, into the parent's KV cache, and the masks then
    run against it: the backward covers the masks alone (the clean columns hold no trainable weight). Under
    activation checkpointing, which drops a KV cache, both run in one forward (the same logits).

    Returns (student, teacher), each (batch, G, k, V): the drafter's logits for those tokens (shift applied: index i
    predicts the token at cut + i; exactly the logits decoding drafts from, `fused_forward`) and the parent's
    causal next-token logits for the same tokens given the true prefix (detached). The student's gradients reach
    the adapter (and the decoder's weights only if they require grad: freeze them). With activation checkpointing,
    run the backward inside `drafting(model)` too, so that the recomputed layers see the adapter and its gate.
    `forward`: a wrapper around `model` (a training engine's) to run the masks' forward with; default `model`."""
    k, (batch, length), g = draft_length, input_ids.shape, cuts.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"draft length must be at least 1, got {k!r}")
    padding = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    real_count = padding.sum(1, keepdim=True)
    if bool((cuts < 2).any() or (cuts > real_count - k).any()):
        raise ValueError(f"cuts must lie in [2, length - draft_length] of each row (lengths {real_count[:, 0].tolist()}"
                         f", draft length {k}), got {cuts.tolist()}")
    device, m = input_ids.device, k + 1
    positions = position_ids_from_padding(padding)
    mask_positions, mask_groups, mask_limits = _mask_columns(cuts - 2, k)
    keys = (torch.cat([padding, padding.new_ones((batch, g * m))], 1), torch.cat([positions, mask_positions], 1),
            torch.cat([torch.full((batch, length), -1, dtype=torch.long, device=device), mask_groups], 1),
            torch.cat([positions, mask_limits], 1))  # real, positions, groups, limits of every column
    # the clean column of each position: real columns first, in order
    column_of = torch.sort((padding == 0).long(), dim=1, stable=True).indices
    predicted = cuts[:, :, None] + torch.arange(k, device=device)  # (batch, G, k): the tokens drafted
    teacher_cols = column_of.gather(1, (predicted - 1).flatten(1)).view(batch, g, k)
    student_cols = (torch.arange(g, device=device)[:, None] * m + group_logit_index(k, model.config.shift).to(device))
    masks = input_ids.new_full((batch, g * m), model.config.mask_token_id)
    if checkpointing_drops_cache(model):
        teacher, student = _one_forward(model, input_ids, masks, keys, teacher_cols, student_cols, forward)
    else:
        teacher, student = _two_passes(model, input_ids, masks, keys, teacher_cols, student_cols, forward)
    return student.view(batch, g, k, -1), teacher.view(batch, g, k, -1).detach()


def _picked(logits, keep, cols):
    """The logits of columns `cols` (batch, ...) from a forward that kept the sorted columns `keep`."""
    at = torch.searchsorted(keep, cols.flatten(1).contiguous())
    return logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))


def _two_passes(model, input_ids, masks, keys, teacher_cols, student_cols, forward):
    (real, positions, groups, limits), length = keys, input_ids.shape[1]
    text_config, keep = model.config.text_config, torch.unique(teacher_cols)
    with torch.no_grad(), drafting(model, start=length):  # the parent: the adapter is off on every clean column
        clean = draft_attention_mask(text_config, real[:, :length], positions[:, :length], groups[:, :length],
                                     limits[:, :length], length, model.dtype)
        cache = full_cache()  # sliding-window layers keep every key: the mask applies the window
        out = model(input_ids=input_ids, attention_mask=clean, position_ids=positions[:, :length],
                    past_key_values=cache, use_cache=True, logits_to_keep=keep)
    attention = draft_attention_mask(text_config, real, positions, groups, limits, masks.shape[1], model.dtype)
    with drafting(model, start=0):
        student = (forward or model)(input_ids=masks, attention_mask=attention, position_ids=positions[:, length:],
                                     past_key_values=cache, use_cache=True,
                                     logits_to_keep=student_cols.flatten()).logits
    return _picked(out.logits, keep, teacher_cols), student


def _one_forward(model, input_ids, masks, keys, teacher_cols, student_cols, forward):
    (real, positions, groups, limits), length = keys, input_ids.shape[1]
    attention = draft_attention_mask(model.config.text_config, real, positions, groups, limits, real.shape[1],
                                     model.dtype)
    keep = torch.unique(torch.cat([teacher_cols.flatten(), length + student_cols.flatten()]))  # sorted
    with drafting(model, start=length):
        logits = (forward or model)(input_ids=torch.cat([input_ids, masks], 1), attention_mask=attention,
                                    position_ids=positions, logits_to_keep=keep).logits
    student = _picked(logits, keep, (length + student_cols)[None].expand(len(input_ids), -1, -1))
    return _picked(logits, keep, teacher_cols), student


__all__ = ["DESIGN", "DrafterAdapter", "DrafterError", "check_drafter_spec", "draft_attention_mask",
           "drafter_targets", "drafter_training_logits", "drafting", "fused_forward", "group_logit_index"]
