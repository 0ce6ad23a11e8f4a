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
boolean and eager an additive mask, with padding combined the standard way. flex/flash attention cannot take it.
"""

import torch

# modeling_masked_diffusion imports transformers_compat directly too, so transformers 5.5 copies it into the
# remote-code cache (it follows only direct relative imports of the loaded module)
from .transformers_compat import bidirectional_mask

# Implementations whose mask interface honours an arbitrary mask function; flash kernels take padding only and
# would silently attend to later blocks.
BLOCK_IMPLEMENTATIONS = ("eager", "sdpa")
LAYER_KINDS = ("full_attention", "sliding_attention")


def check_block_implementation(text_config):
    impl = text_config._attn_implementation
    if impl not in BLOCK_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation '{impl}' cannot take the block-diffusion mask (block-causal "
                         f"attention); load the model with attn_implementation in {BLOCK_IMPLEMENTATIONS}")


def _layer_masks(text_config, padding_mask, embeds, rule):
    """`rule(batch, q, kv, window)` -> visible, built once per layer kind the decoder has: one 4-D mask for
    decoders without `layer_types` (sliding if `sliding_window` is set), else a dict {layer kind: mask}, the
    form those decoders take."""
    check_block_implementation(text_config)
    window = getattr(text_config, "sliding_window", None)

    def build(kind):
        if kind not in LAYER_KINDS:
            raise ValueError(f"block diffusion supports layer types {LAYER_KINDS}, not '{kind}'")
        w = window if kind == "sliding_attention" else None

        def visible(batch_idx, head_idx, q_idx, kv_idx):
            return rule(batch_idx, q_idx, kv_idx, w)

        return bidirectional_mask(config=text_config, inputs_embeds=embeds, attention_mask=padding_mask,
                                  and_mask_function=visible)

    layer_types = getattr(text_config, "layer_types", None)
    if layer_types:
        return {kind: build(kind) for kind in set(layer_types)}
    return build("sliding_attention" if window is not None else "full_attention")


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


def two_l_attention_mask(text_config, padding_mask, position_ids, block_size: int, dtype, document_ids=None):
    """The BD3-LM training mask over [x_t, x_0] (length 2L, positions repeated): a noised token sees its own noised
    block and the clean blocks before it; a clean token sees clean blocks up to its own, never a noised one. With
    `document_ids` ((batch, L)), packed documents never see each other. Returns (2L padding, 2L positions, mask)."""
    length = padding_mask.shape[1]
    padding = torch.cat([padding_mask, padding_mask], 1)
    positions = position_ids.expand(padding_mask.shape[0], -1)
    positions = torch.cat([positions, positions], 1)
    blocks = positions // block_size
    documents = None if document_ids is None else torch.cat([document_ids, document_ids], 1)

    def rule(b, q, kv, window):
        bq, bk = blocks[b, q], blocks[b, kv]
        q_clean, kv_clean = q >= length, kv >= length
        seen = torch.where(q_clean, kv_clean & (bk <= bq), torch.where(kv_clean, bk < bq, bk == bq))
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


def two_l_layout(model, noisy_ids, clean_ids, attention_mask=None, block_size=None, document_ids=None):
    """What one 2L forward of `model` takes: `dict(input_ids, attention_mask, position_ids, logits_to_keep)` for the
    model itself or a wrapper around it (a training engine's, PEFT's), and the (batch, L) `canvas_index` to gather with when the
    rows' block ends differ (left padding); None when `logits_to_keep` already selects them (the logits then come
    out in canvas order, L per row rather than 2L). `attention_mask` is the 2-D padding mask of the L tokens;
    positions count real tokens, as in `MaskedDiffusionLM.forward`. `block_size` defaults to the checkpoint's."""
    config = model.config
    block_size = block_size if block_size is not None else config.block_size
    if block_size is None:
        raise ValueError("the 2L layout needs a block size (config.block_size is None)")
    if noisy_ids.shape != clean_ids.shape:
        raise ValueError(f"noisy and clean ids differ in shape: {tuple(noisy_ids.shape)} vs {tuple(clean_ids.shape)}")
    padding = attention_mask if attention_mask is not None else torch.ones_like(noisy_ids)
    positions = (padding.long().cumsum(-1) - 1).clamp_min(0)
    _, positions2, mask = two_l_attention_mask(config.text_config, padding, positions, block_size, model.dtype,
                                               document_ids)
    index = canvas_index(positions, block_size, config.shift)
    same = bool((index == index[:1]).all())
    inputs = dict(input_ids=torch.cat([noisy_ids, clean_ids], 1), attention_mask=mask, position_ids=positions2,
                  logits_to_keep=index[0] if same else torch.arange(2 * noisy_ids.shape[1], device=index.device))
    return inputs, None if same else index


def canvas_logits(logits, index):
    """The 2L forward's logits in canvas order (see `two_l_layout`)."""
    if index is None:
        return logits
    return logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def forward_2l(model, noisy_ids, clean_ids, attention_mask=None, block_size=None, document_ids=None, **kwargs):
    """One forward of the 2L training layout: `noisy_ids` (x_t) and `clean_ids` (x_0), both (batch, L), run as one
    sequence of 2L with the BD3-LM mask. Returns the decoder's output with L logits per row, each the one the
    denoiser reads at inference (`canvas_index`), so the objective aligns them exactly as on a canvas."""
    inputs, index = two_l_layout(model, noisy_ids, clean_ids, attention_mask, block_size, document_ids)
    out = model.decoder(**inputs, **kwargs)
    out.logits = canvas_logits(out.logits, index)
    return out


__all__ = ["BLOCK_IMPLEMENTATIONS", "block_attention_mask", "canvas_index", "canvas_logits",
           "check_block_implementation", "forward_2l", "two_l_attention_mask", "two_l_layout"]
