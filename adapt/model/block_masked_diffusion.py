# Written into every converted checkpoint as remote code: imports only torch and transformers.
"""Block diffusion (BD3-LM, Fast-dLLM v2, SDAR): the sequence is cut into blocks of `block_size` tokens; attention
is bidirectional inside a block and causal between blocks. B = 1 (with shift) is the AR parent, B >= L is
full-sequence masked diffusion.

Blocks are counted by position id, not by canvas index: a token's block is `position_id // block_size`. With the
positions `forward` derives from a left-padded mask (real tokens count from 0), a left-padded row therefore has
exactly the blocks, and the outputs, of the same row alone; block boundaries never depend on the padding.

Sliding-window layers keep their window: a key in an earlier block is visible iff pos_i - pos_j < window (the
causal model's window), a key in the query's own block iff |pos_i - pos_j| <= window (transformers' bidirectional
window, which full-sequence mode uses). So B = 1 is exactly the AR parent and B >= L exactly full-sequence mode,
in every layer type.

The masks are built by transformers' own `create_bidirectional_mask` with an `and_mask_function`, so sdpa gets a
boolean and eager an additive mask, flex attention a BlockMask (which skips the tiles the rule masks out: most of
the 2L layout's), with padding combined the standard way. One rule per layout (`rule(batch, q, kv, window)`) feeds
all three. Flash attention cannot take it (it honours padding only).
"""

import math

import torch

# modeling_masked_diffusion imports transformers_compat and the sampler directly too, so transformers 5.5 copies
# them into the remote-code cache (it follows only direct relative imports of the loaded module)
from .sampling_masked_diffusion import (SCORES, Denoiser, Ranking, SamplingError, SamplingOutput, Stream, TokenRule,
                                        _check_prompt, _finish_rows, _holes, check_sampling_options, commit_rule,
                                        denoise_span)
from .transformers_compat import bidirectional_mask, drop_last_cached, full_cache, select_cache_rows


def position_ids_from_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only (padding repeats its neighbour's), so left padding moves no token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def resolve_block_size(config, override: int | None = None, needed_by: str | None = None) -> int | None:
    """The block size to use: `override` when given, else the checkpoint's `config.block_size` (None: a
    full-sequence checkpoint). `needed_by` names what cannot run without one: None is then an error."""
    block_size = override if override is not None else getattr(config, "block_size", None)
    if block_size is None and needed_by is not None:
        raise ValueError(f"{needed_by} needs a block size (config.block_size is None)")
    return block_size

def check_block_options(block_size: int | None, *, block_length=None, kv_cache=None, sub_block=None):
    """What a checkpoint's block size (None: full-sequence) rules out among the decoding options, as `SamplingError`;
    `diffusion_generate`, `adapt.generate` (from config.json, before the weights load) and the lm-eval backend ask
    here."""
    if block_size is not None and (kv_cache is not None or block_length not in (None, block_size)):
        raise SamplingError(f"a block-diffusion checkpoint decodes its own blocks of {block_size} with an exact KV "
                            "cache: leave block_length and kv_cache (--block-length, --kv-cache) unset")
    if block_size is not None and sub_block is not None and block_size % sub_block:
        raise SamplingError(f"sub_block ({sub_block}) must divide the block size ({block_size})")
    if block_size is None and sub_block is not None:
        raise SamplingError("sub_block divides the blocks of a block-diffusion checkpoint; this one is full-sequence: "
                            "use block_length (--block-length) for semi-autoregressive blocks")


# Implementations whose mask interface honours an arbitrary mask function; flash kernels take padding only and
# would silently attend to later blocks. DENSE_IMPLEMENTATIONS: those that take a dense 4-D mask (what masks built
# by hand for other layouts, such as a drafter's fused round, are).
BLOCK_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention")
DENSE_IMPLEMENTATIONS = ("eager", "sdpa")
LAYER_KINDS = ("full_attention", "sliding_attention")


def check_block_implementation(text_config, supported=BLOCK_IMPLEMENTATIONS):
    impl = text_config._attn_implementation
    if impl not in supported:
        raise ValueError(f"attention implementation '{impl}' cannot take the block-diffusion mask (block-causal "
                         f"attention); load the model with attn_implementation in {supported}")


def _per_layer_kind(text_config, build):
    """`build(window)` (None: full attention) once per layer kind the decoder has: one 4-D mask for decoders
    without `layer_types` (sliding if `sliding_window` is set), else a dict {layer kind: mask}, the form those
    decoders take."""
    check_block_implementation(text_config)
    window = getattr(text_config, "sliding_window", None)

    def of_kind(kind):
        if kind not in LAYER_KINDS:
            raise ValueError(f"block diffusion supports layer types {LAYER_KINDS}, not '{kind}'")
        return build(window if kind == "sliding_attention" else None)

    layer_types = getattr(text_config, "layer_types", None)
    if layer_types:
        return {kind: of_kind(kind) for kind in set(layer_types)}
    return of_kind("sliding_attention" if window is not None else "full_attention")


def _layer_masks(text_config, padding_mask, embeds, rule):
    """`rule(batch, q, kv, window)` -> visible, built by transformers' mask builder per layer kind."""

    def build(w):
        def visible(batch_idx, head_idx, q_idx, kv_idx):
            return rule(batch_idx, q_idx, kv_idx, w)

        return bidirectional_mask(config=text_config, inputs_embeds=embeds, attention_mask=padding_mask,
                                  and_mask_function=visible)

    return _per_layer_kind(text_config, build)


def _in_window(distance, same_block, window):
    if window is None:
        return torch.ones_like(same_block)
    return torch.where(same_block, distance.abs() <= window, distance < window)


def _embeds(padding_mask, dtype):
    # the builders read batch size, length, dtype (eager's additive mask) and device from it; no memory needed
    return torch.empty(*padding_mask.shape, 0, dtype=dtype, device=padding_mask.device)


def block_attention_mask(text_config, padding_mask, position_ids, block_size: int, dtype):
    """The `attention_mask` for the decoder on a canvas: block-causal by position id, padding keys hidden."""
    blocks = position_ids.expand(padding_mask.shape[0], -1) // block_size
    positions = position_ids.expand(padding_mask.shape[0], -1)

    def rule(b, q, kv, window):
        bq, bk = blocks[b, q], blocks[b, kv]
        return (bk <= bq) & _in_window(positions[b, q] - positions[b, kv], bk == bq, window)

    return _layer_masks(text_config, padding_mask, _embeds(padding_mask, dtype), rule)


CLEAN_ATTENTION = ("block", "causal")


def clean_attention_of(config) -> str:
    """How the clean (finished) tokens of a block-diffusion checkpoint attend inside their own block: `block`
    (both ways, BD3-LM) or `causal` (token-causal: the clean stream is an exact AR model). Older checkpoints: block."""
    mode = getattr(config, "clean_attention", None) or "block"
    if mode not in CLEAN_ATTENTION:
        raise ValueError(f"clean_attention must be one of {CLEAN_ATTENTION}, got {mode!r}")
    return mode


def _clean_sees(bq, bk, q_positions, k_positions, clean_attention: str):
    """THE rule for a clean query: the clean keys of its own and earlier blocks (`block`), or, `causal`, the
    earlier blocks and its own block up to itself."""
    if clean_attention == "causal":
        return (bk < bq) | (bk == bq) & (k_positions <= q_positions)
    return bk <= bq


def cached_block_mask(text_config, padding_mask, query_positions, block_size: int, dtype, clean_attention="block"):
    """The mask of a block-causal forward over a KV cache: `padding_mask` (batch, kv) covers the cached keys and
    then the q queries, whose position ids are `query_positions` (batch, q). Same rule as `block_attention_mask`;
    built here because transformers' builders size a mask by the cache's layer type, while block decoding keeps
    every position in every layer (`full_cache`). A padding query sees itself, so no row is fully masked.
    `clean_attention="causal"`: the queries before the last block are finished (clean) tokens and attend as the
    2L layout's clean stream does (`_clean_sees`); the last block is the one being denoised (with B = 1 the two
    rules agree, so a forward of finished tokens alone is right too)."""
    kv, q = padding_mask.shape[1], query_positions.shape[1]
    key_positions = position_ids_from_padding(padding_mask)[:, None, :]
    query_positions = query_positions.expand(padding_mask.shape[0], -1)[:, :, None]
    bq, bk = query_positions // block_size, key_positions // block_size
    keys = torch.arange(kv, device=padding_mask.device)
    itself = keys == keys[kv - q:, None]
    real = padding_mask.bool()[:, None, :]
    visible = bk <= bq
    if clean_attention == "causal":
        clean = bq < bq[:, -1:]  # earlier than the block being denoised
        visible = torch.where(clean, _clean_sees(bq, bk, query_positions, key_positions, "causal"), visible)

    def build(window):
        seen = visible & _in_window(query_positions - key_positions, bk == bq, window) & real | itself
        if text_config._attn_implementation == "flex_attention":
            return flex_block_mask(seen)
        if text_config._attn_implementation == "sdpa":
            return seen[:, None]
        additive = torch.zeros(seen.shape, dtype=dtype, device=seen.device)  # eager adds the mask to its scores
        return additive.masked_fill(~seen, torch.finfo(dtype).min)[:, None]

    return _per_layer_kind(text_config, build)


def flex_block_mask(seen: torch.Tensor):
    """A flex-attention BlockMask equal to the dense (batch, q, kv) boolean `seen` (True: attend). `seen` is padded
    with False to whole tiles, so the mask function never reads past it whatever tile a kernel evaluates."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, q, kv = seen.shape
    tile = 128  # create_block_mask's default BLOCK_SIZE, passed explicitly
    padded = torch.nn.functional.pad(seen, (0, -kv % tile, 0, -q % tile))

    def visible(batch_idx, head_idx, q_idx, kv_idx):
        return padded[batch_idx, q_idx, kv_idx]

    return create_block_mask(visible, batch, None, q, kv, device=seen.device, BLOCK_SIZE=tile)


def two_l_attention_mask(text_config, padding_mask, position_ids, block_size: int, dtype, document_ids=None,
                         clean_attention: str = "block"):
    """The BD3-LM training mask over [x_t, x_0] (length 2L, positions repeated): a noised token sees its own noised
    block and the clean blocks before it; a clean token sees clean blocks up to its own (`clean_attention="block"`)
    or, `causal`, the clean tokens up to itself (`_clean_sees`), never a noised one. With `document_ids`
    ((batch, L)), packed documents never see each other. Returns (2L padding, 2L positions, mask)."""
    length = padding_mask.shape[1]
    padding = torch.cat([padding_mask, padding_mask], 1)
    positions = position_ids.expand(padding_mask.shape[0], -1)
    positions = torch.cat([positions, positions], 1)
    blocks = positions // block_size
    documents = None if document_ids is None else torch.cat([document_ids, document_ids], 1)

    def rule(b, q, kv, window):
        bq, bk = blocks[b, q], blocks[b, kv]
        q_clean, kv_clean = q >= length, kv >= length
        clean_rule = _clean_sees(bq, bk, positions[b, q], positions[b, kv], clean_attention)
        seen = torch.where(q_clean, kv_clean & clean_rule, torch.where(kv_clean, bk < bq, bk == bq))
        if documents is not None:
            seen = seen & (documents[b, q] == documents[b, kv])
        return seen & _in_window(positions[b, q] - positions[b, kv], bk == bq, window)

    return padding, positions, _layer_masks(text_config, padding, _embeds(padding, dtype), rule)


def canvas_index(position_ids, block_size: int, shift: bool):
    """(batch, L) index into the 2L forward's outputs of the logit inference reads at each canvas position (where
    the blocks before the one being denoised are clean): the noised half's, except with shift at the last position
    of each block, which predicts the next block's first token and so comes from the clean half (Fast-dLLM v2's
    token shift; with B = 1 every logit is the causal parent's on x_0). Block ends go by position id."""
    length = position_ids.shape[-1]
    index = torch.arange(length, device=position_ids.device).expand_as(position_ids)
    if not shift:
        return index
    return index + length * (position_ids % block_size == block_size - 1).long()


def two_l_layout(model, noisy_ids, clean_ids, attention_mask=None, block_size=None, document_ids=None,
                 clean_logits: bool = False):
    """What one 2L forward of `model` takes: `dict(input_ids, attention_mask, position_ids, logits_to_keep)` for the
    model itself or a wrapper around it (a training engine's, PEFT's), and the (batch, L) `canvas_index` to gather with when the
    rows' block ends differ (left padding); None when `logits_to_keep` already selects them (the logits then come
    out in canvas order, L per row rather than 2L). `attention_mask` is the 2-D padding mask of the L tokens;
    positions count real tokens, as in `MaskedDiffusionLM.forward`. `block_size` defaults to the checkpoint's, and
    the clean stream's attention is the checkpoint's `clean_attention`. `clean_logits`: every position's logit is
    computed (the clean half's too), and the index is always returned."""
    config = model.config
    block_size = resolve_block_size(config, block_size, needed_by="the 2L layout")
    if noisy_ids.shape != clean_ids.shape:
        raise ValueError(f"noisy and clean ids differ in shape: {tuple(noisy_ids.shape)} vs {tuple(clean_ids.shape)}")
    padding = attention_mask if attention_mask is not None else torch.ones_like(noisy_ids)
    positions = position_ids_from_padding(padding)
    _, positions2, mask = two_l_attention_mask(config.text_config, padding, positions, block_size, model.dtype,
                                               document_ids, clean_attention_of(config))
    index = canvas_index(positions, block_size, config.shift)
    same = bool((index == index[:1]).all()) and not clean_logits
    inputs = dict(input_ids=torch.cat([noisy_ids, clean_ids], 1), attention_mask=mask, position_ids=positions2,
                  logits_to_keep=index[0] if same else torch.arange(2 * noisy_ids.shape[1], device=index.device))
    return inputs, None if same else index


def canvas_logits(logits, index):
    """The 2L forward's logits in canvas order (see `two_l_layout`)."""
    if index is None:
        return logits
    return logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def two_l_logits(model, noisy_ids, clean_ids, attention_mask=None, block_size=None, document_ids=None,
                 forward=None, clean_logits: bool = False):
    """One forward of the 2L layout: `noisy_ids` (x_t) and `clean_ids` (x_0), both (batch, L), run as one sequence
    of 2L with the BD3-LM mask. Returns L logits per row, each the one the denoiser reads at inference
    (`canvas_index`), so the objective aligns them exactly as on a canvas. `forward` runs the layout's inputs: a
    wrapper around `model` (a training engine's, PEFT's) during training; default `model` itself. Training, the
    likelihood and the tests all take the 2L logits from here. `clean_logits=True` returns (those logits, the clean
    half's L logits): with `clean_attention="causal"` and shift, the clean half's logit at i is the checkpoint's
    AR prediction of token i + 1."""
    inputs, index = two_l_layout(model, noisy_ids, clean_ids, attention_mask, block_size, document_ids, clean_logits)
    logits = (forward if forward is not None else model)(**inputs).logits
    if clean_logits:
        return canvas_logits(logits, index), logits[:, noisy_ids.shape[1]:]
    return canvas_logits(logits, index)


# ------------------------------------------------------------------------------------------------ decoding

class BlockCacheDenoiser(Denoiser):
    """Block decoding with an exact KV cache. Under block-causal attention a finished block never sees the blocks
    after it, so its keys/values are final: they are computed once and kept. A pass runs only the current block's
    tokens (bidirectional among themselves) against the cache, which it leaves as it found it. The first pass over
    a new block also runs the tokens finished since the cache was last extended (at first: the prompt's whole
    blocks) in front of it, and keeps their keys/values: the mask is block-causal, so what they compute there is
    exactly what a separate pass over them alone would, and no pass is spent on storing. That pass's logit at the
    last finished position is the one that, with shift, predicts the block's first token, as the 2L layout's clean
    half does (`canvas_index`). With B = 1 and shift that logit is all a block needs, so each token costs the one
    pass over one token an AR model's does. Rows that have finished leave the batch (and the cache): the passes
    after that run only the rows still decoding."""

    def __init__(self, model, padding):
        super().__init__(model.config.shift)
        self.model, self.padding = model, padding
        self.positions = position_ids_from_padding(padding)
        self.cache, self.cached, self.last = full_cache(), 0, None  # keys/values of canvas [0, cached)
        self.rows = torch.arange(len(padding), device=padding.device)  # the rows still computed, and cached
        self.cache_hits = self.positions_computed = 0

    def finished(self, done):
        still = ~done[self.rows]
        if still.all():
            return
        local = still.nonzero()[:, 0]
        select_cache_rows(self.cache, local)
        self.rows = self.rows[local]
        self.last = None if self.last is None else self.last[local]

    def logits(self, canvas, attention_mask, first, last):
        start, end = first + self.shift, last + self.shift  # the block
        if start < self.cached:
            raise ValueError(f"block decoding moves forward: block starts at {start}, {self.cached} are cached")
        a, upto = self.cached, end if last > start else start  # B = 1 with shift needs no block token
        parts = []
        if first < 0:  # before the canvas nothing masked is predicted (a prompt token is there): zeros
            vocab = self.model.get_output_embeddings().weight.shape[0]
            parts.append(canvas.new_zeros((len(self.rows), 1, vocab), dtype=torch.float))
            first = 0
        elif first < a:  # the logit before the block, computed by the pass that cached it
            parts.append(self.last[:, None])
            first = a
        if upto > a:
            keep = torch.arange(first, last, device=canvas.device) - a
            rows = self.rows
            logits = self.model(input_ids=canvas[rows, a:upto], attention_mask=self.padding[rows, :upto],
                                position_ids=self.positions[rows, a:upto], past_key_values=self.cache,
                                use_cache=True, logits_to_keep=keep).logits
            if self.shift and a < start:
                self.last = logits[:, start - 1 - first]
            drop_last_cached(self.cache, upto - start)  # the block's own keys/values change with its tokens
            self.cache_hits += a * len(rows)
            self.positions_computed += (upto - a) * len(rows)
            self.cached = start
            parts.append(logits)
        logits = torch.cat([p.to(parts[-1].dtype) for p in parts], 1)
        if len(self.rows) == len(canvas):
            return logits
        full = logits.new_zeros((len(canvas), *logits.shape[1:]))  # finished rows: never read
        full[self.rows] = logits
        return full


class BlockCanvas:
    """The canvas of block decoding, in which every row is re-padded on the left so that all rows' blocks share
    canvas indices: block k of the loop is the same position-id block of each row as when decoded alone. Each row
    holds its prompt, then `max_new_tokens` masks, up to whole blocks (positions past its new tokens stay masked
    and are not returned)."""

    def __init__(self, input_ids, attention_mask, *, block_size: int, max_new_tokens: int, mask_token_id: int,
                 max_positions: int | None):
        n, b = max_new_tokens, block_size
        self.input_ids, self.n, self.block_size = input_ids, n, b
        self.real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids,
                                                                                              dtype=torch.bool)
        self.lengths = lengths = self.real.sum(1)
        whole, tail = lengths // b, lengths % b
        self.needed = (tail + n + b - 1) // b  # blocks each row decodes after its whole prompt blocks
        self.first, blocks = int(whole.max()), int(self.needed.max())
        if max_positions is not None and int(whole.max() + blocks) * b > max_positions:
            raise SamplingError(f"prompt + max_new_tokens, rounded up to whole blocks of {b} over the batch, "
                                f"exceeds the model's {max_positions} positions")
        self.end = self.first + blocks  # the loop's blocks end here
        self.offset = offset = (self.first - whole) * b  # left padding that aligns every row's blocks
        self.index = index = torch.arange(self.end * b, device=input_ids.device)
        self.padding = (index[None] >= offset[:, None]).long()
        self.prompt = (index[None] >= offset[:, None]) & (index[None] < (offset + lengths)[:, None])
        self.canvas = torch.full(self.padding.shape, mask_token_id, dtype=input_ids.dtype, device=input_ids.device)
        self.canvas[self.prompt] = input_ids[self.real]
        self.new = index[None] - (offset + lengths)[:, None]  # per row, the index among its new tokens (< 0: prompt)
        self.todo = (self.new >= 0) & (self.new < n) | self.prompt & (self.canvas == mask_token_id)  # + holes
        self.gather = (offset + lengths)[:, None] + torch.arange(n, device=input_ids.device)

    def first_block(self, holes) -> int:
        """The loop's first block: the first one holding a hole, else the one after the prompt's whole blocks."""
        return int(self.index[(self.prompt & self.todo).any(0)].min()) // self.block_size if holes.any() else self.first

    def new_tokens(self, canvas, upto: int) -> list:
        """Per row, its new tokens in canvas [0, upto)."""
        ready = (upto - self.offset - self.lengths).clamp(0, self.n)
        return [canvas[r, self.gather[r, : int(ready[r])]] for r in range(len(canvas))]

    def returned(self, canvas):
        """`canvas` in the usual layout: (batch, prompt_len + max_new_tokens)."""
        prompt_part = self.input_ids.clone()
        prompt_part[self.real] = canvas[self.prompt]
        return torch.cat([prompt_part, canvas.gather(1, self.gather)], 1)


def block_diffusion_sample(make_denoiser, input_ids, *, block_size: int, mask_token_id: int, shift: bool,
                           max_new_tokens: int, steps: int, attention_mask=None, sub_block=None,
                           remasking="low_confidence", schedule="linear", threshold=None, entropy_bound=None,
                           temperature=0.0, order_temperature=0.0, top_k=None, top_p=None, eos_token_id=None,
                           min_new_tokens=0, max_positions=None, generator=None, return_history=False,
                           streamer=None) -> SamplingOutput:
    """Block-by-block decoding of a block-diffusion checkpoint, with the full-sequence sampler's rules inside each
    block (`TokenRule`, `SCORES`, `commit_rule`, `denoise_span`).

    Blocks go by position id (block = position // B, real tokens counting from 0), as in training. A prompt of
    length L leaves its last L % B tokens in a partial block; the first decoded block is that one, its prompt
    tokens fixed (and recomputed each pass: they attend to the block's masks) and the rest new. The rows share
    canvas indices (`BlockCanvas`).

    `sub_block` S (Fast-dLLM v2) commits a block's tokens S at a time, left to right: every pass still runs the
    whole block (its attention unit), but only the current sub-block's masks may be committed. Each (sub-)block
    gets ceil(steps * S / max_new_tokens) passes under the schedule (at most S: one token each); with `threshold`
    or `entropy_bound`, as many as it needs. max_new_tokens need not be a multiple of B: in the last block the
    positions past it stay masked (the block sees them as masks) and are not returned.

    Mask tokens in the prompt are holes, filled block by block from the first block holding one: a hole sees its
    own block on both sides and every block before it, never a later block (the attention the model was trained
    with; make B at least the prompt's length for holes that see everything). Blocks with no hole cost no pass.

    A row stops when its EOS is committed with nothing masked before it (the rest of its tokens become EOS) or
    when its tokens are all decoded; passes after that are not counted in its `row_nfe`. `streamer` gets a single
    row's tokens as each sub-block is done. `make_denoiser(padding)` builds the denoiser for the internal canvas
    (`BlockCacheDenoiser`, or an uncached one as a reference).
    Returns a `SamplingOutput` in the usual layout: (batch, prompt_len + max_new_tokens)."""
    n, b = max_new_tokens, block_size
    check_sampling_options(max_new_tokens=n, steps=steps, remasking=remasking, schedule=schedule,
                           threshold=threshold, entropy_bound=entropy_bound, temperature=temperature,
                           order_temperature=order_temperature, top_k=top_k, top_p=top_p,
                           min_new_tokens=min_new_tokens, sub_block=sub_block)
    s = sub_block or b
    if b % s:
        raise SamplingError(f"sub_block ({s}) must divide the block size ({b})")
    _check_prompt(input_ids, attention_mask, mask_token_id=mask_token_id, shift=shift, max_new_tokens=n,
                  max_positions=None)
    holes = _holes(input_ids, mask_token_id, attention_mask)
    if streamer is not None and (n == 0 or holes.any()):
        raise SamplingError("streaming shows new tokens: it needs max_new_tokens > 0 and cannot show holes filled "
                            "in the prompt; infill without a streamer")
    layout = BlockCanvas(input_ids, attention_mask, block_size=b, max_new_tokens=n, mask_token_id=mask_token_id,
                         max_positions=max_positions)
    canvas, todo, index = layout.canvas, layout.todo, layout.index
    units = n or int(holes.max())  # what `steps` is spread over
    commit = commit_rule(min(s, max(1, math.ceil(steps * s / units))), schedule, threshold, entropy_bound)
    choose = TokenRule(mask_token_id, temperature, top_k, top_p, eos_token_id, (0, min_new_tokens), generator)
    rank = Ranking(SCORES[remasking], order_temperature, generator)
    stream = Stream(streamer, input_ids, eos_token_id)
    denoiser = make_denoiser(layout.padding)
    done = torch.zeros(len(canvas), dtype=torch.bool, device=canvas.device)
    out = SamplingOutput.start(canvas, return_history)
    for k in range(layout.first_block(holes), layout.end):
        start = k * b
        for sub_end in range(start + s, start + b + 1, s):  # the block's sub-blocks, left to right
            eligible = todo & (index[None] < sub_end) & ~done[:, None]
            counts = ((canvas == mask_token_id) & eligible).sum(1)
            denoise_span(denoiser, canvas, layout.padding, start, start + b, eligible, counts, layout.new,
                         mask_token_id=mask_token_id, commit=commit, choose=choose, rank=rank, out=out)
            if eos_token_id is not None and n:
                tokens = canvas.gather(1, layout.gather)
                done = _finish_rows(tokens, 0, eos_token_id, mask_token_id, done)
                canvas.scatter_(1, layout.gather, tokens)
            stream.final(layout.new_tokens(canvas, sub_end) if streamer is not None else None)
        done = stream.stopped(done | (layout.needed <= k + 1 - layout.first))
        if done.all():
            break
        denoiser.finished(done)
    stream.end()
    out.sequences = layout.returned(canvas)
    out.history = None if out.history is None else [layout.returned(c) for c in out.history]
    out.cache_hits = getattr(denoiser, "cache_hits", None)
    out.positions_computed = getattr(denoiser, "positions_computed", None)
    return out


__all__ = ["BLOCK_IMPLEMENTATIONS", "BlockCacheDenoiser", "CLEAN_ATTENTION", "DENSE_IMPLEMENTATIONS",
           "block_attention_mask", "block_diffusion_sample", "cached_block_mask", "canvas_index", "canvas_logits",
           "check_block_implementation", "clean_attention_of", "flex_block_mask", "position_ids_from_padding",
           "resolve_block_size", "two_l_logits", "two_l_attention_mask", "two_l_layout"]
