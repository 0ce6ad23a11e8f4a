"""Attention-mask annealing (DiffuLLaMA): from the causal mask to full bidirectional attention.

At mask ratio r every future key j > i is visible to query i with probability r, drawn once per step and
shared by the batch, heads and layers; the causal part is always visible. The masks are built by
transformers' own builders (`create_causal_mask`, `create_sliding_window_causal_mask`) with an
`or_mask_function`, so each attention implementation gets the format it honours (boolean for sdpa, additive
float for eager, a BlockMask for flex attention, which skips the tiles nothing sees) and padding is combined the
standard way. The draw itself is one (L, L) boolean (not per row, never float per row).

The two ends build nothing (`annealed_inputs`): at r = 0 the model runs its own causal path (sdpa's fused causal
kernel without padding), at r = 1 its plain bidirectional path, where sdpa needs no mask tensor without padding.
"""

import copy
import math

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ..conversion.architectures import check_architecture
from ..config.diffusion import AnnealConfig
from ..errors import AdaptError
from ..model.block_masked_diffusion import position_ids_from_padding
from ..model.transformers_compat import causal_mask

# Implementations whose mask interface honours an arbitrary mask function, as tested here. flash-attention
# takes only causal/padding information and would silently drop the annealing mask (a DiffuLLaMA bug).
ANNEALING_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention")


def mask_ratio(step: int, cfg: AnnealConfig) -> float:
    if cfg.mode == "none" or cfg.anneal_steps <= 0:
        return 1.0
    x = min(1.0, (step + 1) / cfg.anneal_steps)
    return x if cfg.schedule == "linear" else 0.5 * (1 - math.cos(math.pi * x))


def check_annealing_supported(model, cfg: AnnealConfig):
    impl = model.config.text_config._attn_implementation
    if cfg.mode != "none" and impl not in ANNEALING_IMPLEMENTATIONS:
        raise AdaptError(f"attention implementation '{impl}' cannot honour the annealing mask; load the model with "
                         f"attn_implementation in {ANNEALING_IMPLEMENTATIONS}, or set anneal.mode=none")


def annealed_inputs(model, padding_mask: torch.Tensor, ratio: float, generator=None) -> dict:
    """The attention keywords of `model(...)` at mask ratio `ratio`: `attention_mask` (see
    `annealed_attention_mask`), and `is_causal=True` at ratio 0, where the model's own causal mask is exactly the
    annealing mask and no mask (and no random draw) is needed."""
    if ratio <= 0.0:
        return dict(attention_mask=padding_mask, is_causal=True)
    return dict(attention_mask=annealed_attention_mask(model, padding_mask, ratio, generator))


def _future(length: int, ratio: float, generator, device) -> torch.Tensor:
    """(L, L) booleans: key j > i visible to query i with probability `ratio` (the causal part is added by the
    builder). The uniform draw is the one earlier releases made, so a run's noise stream is unchanged."""
    draw = torch.rand(length, length, generator=generator, device=generator.device if generator else device)
    future = draw < ratio
    del draw
    return future.triu_(1).to(device)


def annealed_attention_mask(model, padding_mask: torch.Tensor, ratio: float, generator=None):
    """The `attention_mask` argument for `model(...)` at mask ratio `ratio`: a prebuilt mask (one 4-D tensor or
    BlockMask, or a dict per layer type for decoders that take one), or the 2-D padding mask itself when ratio
    is 1."""
    if ratio >= 1.0:
        return padding_mask
    config = model.config.text_config
    batch, length = padding_mask.shape
    device = padding_mask.device
    future = _future(length, ratio, generator, device)
    causal = copy.copy(config)
    causal.is_causal = True  # build on top of the causal mask; the model itself stays bidirectional
    embeds = torch.empty(batch, length, 0, dtype=model.dtype, device=device)
    kwargs = dict(config=causal, inputs_embeds=embeds, attention_mask=padding_mask,
                  position_ids=position_ids_from_padding(padding_mask))
    window = getattr(config, "sliding_window", None)

    def full(batch_idx, head_idx, q_idx, kv_idx):
        return future[q_idx, kv_idx]

    def sliding(batch_idx, head_idx, q_idx, kv_idx):
        return future[q_idx, kv_idx] & (kv_idx - q_idx <= window)

    def build(kind):
        if kind == "sliding_attention":
            return causal_mask(create_sliding_window_causal_mask, **kwargs, or_mask_function=sliding)
        return causal_mask(create_causal_mask, **kwargs, or_mask_function=full, allow_is_causal_skip=False)

    if check_architecture(config).layer_type_masks:
        return {kind: build(kind) for kind in set(config.layer_types)}
    return build("sliding_attention" if window is not None else "full_attention")
