"""Block diffusion training (BD3-LM, Fast-dLLM v2, SDAR, LLaDA 2.0; REFERENCE §10): the 2L layout, per-block
noise, and the block-size schedule.

Text is cut into blocks of B tokens, generated left to right; inside a block, tokens are denoised in parallel. A
training step sees every block as inference will, in one forward pass over the "2L" layout: the noised sequence
x_t followed by the clean x_0, with the same position ids twice, under the mask `two_l_visible`:
- a noised block sees itself (both ways) and the clean blocks before it;
- a clean block sees itself and the clean blocks before it, never a noised token.

Shift (Fast-dLLM v2): the logit at j−1 predicts token j. Inside a block that logit is the noised half's; for the
first token of a block it is the last clean position of the block before. `canvas_logits` picks, per position,
the logit inference computes there (a canvas whose earlier blocks are clean), so the loss applies shift exactly
as the sampler and the likelihood do. At B = 1 every logit comes from the clean half under a causal mask: the AR
parent, exactly.
"""

import copy
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .architectures import check_architecture
from .errors import AdaptError
from .model.transformers_compat import causal_mask
from .ranges import FieldError, check_ranges

# implementations whose mask interface takes an arbitrary mask function (flash-attention takes only padding)
BLOCK_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass
class BlockConfig:
    """Block diffusion in training (`block:` in a recipe)."""

    size: int | None = None
    """Block size B. None: the checkpoint's (a full-sequence checkpoint trains as today). A causal source is
    converted with this block size."""
    schedule: list[int] = field(default_factory=list)
    """Warmup from AR to blocks (LLaDA 2.0's warmup–stable–decay): the block sizes of successive stages, e.g.
    [1, 4, 16], each trained for `stage_steps` optimizer steps; the last is `size` and lasts until the decay.
    Empty: `size` from the first step."""
    stage_steps: int = 0
    """Optimizer steps of each warmup stage but the last."""
    decay_to: int | None = None
    """Serving block size for the last `decay_steps` steps (it becomes the checkpoint's block size). None: none."""
    decay_steps: int = 0
    noise: Literal["block", "sequence"] = "block"
    """`block`: one t per block, stratified across a row's blocks (a shifted lattice, as MDLM's antithetic t);
    `sequence`: one t per row, as in full-sequence training."""

    def __post_init__(self):
        check_ranges(self, {"size": "[1, inf)", "schedule": "[1, inf)", "stage_steps": "[0, inf)",
                            "decay_to": "[1, inf)", "decay_steps": "[0, inf)"})
        if self.schedule and self.size is None:
            raise FieldError("schedule", "needs block.size, the block size it ends at")
        if self.schedule and self.schedule[-1] != self.size:
            raise FieldError("schedule", f"must end at block.size ({self.size}), got {self.schedule}; "
                                         f"append {self.size}")
        if len(self.schedule) > 1 and self.stage_steps < 1:
            raise FieldError("stage_steps", "must be at least 1 when block.schedule has several stages")
        if self.decay_to is not None and (self.size is None or self.decay_steps < 1):
            raise FieldError("decay_to", "needs block.size and block.decay_steps >= 1")

    def size_at(self, step: int, max_steps: int, checkpoint_size: int | None) -> int | None:
        """The block size trained at optimizer step `step` (0-based) of `max_steps`."""
        if self.decay_to is not None and step >= max_steps - self.decay_steps:
            return self.decay_to
        if self.schedule:
            return self.schedule[min(step // max(self.stage_steps, 1), len(self.schedule) - 1)]
        return self.size if self.size is not None else checkpoint_size

    def final_size(self, checkpoint_size: int | None) -> int | None:
        """The block size the trained model decodes with."""
        if self.decay_to is not None:
            return self.decay_to
        return self.size if self.size is not None else checkpoint_size


def block_t(rows: int, length: int, block_size: int, eps: float, generator=None, device=None) -> torch.Tensor:
    """(rows, length) noise levels, one per block: a shifted lattice across a row's blocks, so each row's blocks
    cover (0, 1) evenly while each block's t stays uniform; t = (1 − eps)·u + eps as in `objective.sample_t`."""
    n = math.ceil(length / block_size)
    offset = torch.rand(rows, 1, generator=generator, device=device)
    u = (offset + torch.arange(n, device=offset.device) / n) % 1.0
    u = u[:, torch.randperm(n, generator=generator, device=device)]  # no block position always gets the low t
    t = (1 - eps) * u + eps
    return t.repeat_interleave(block_size, dim=1)[:, :length]


def two_l_inputs(x_t: torch.Tensor, x0: torch.Tensor, padding: torch.Tensor):
    """(input_ids, position_ids, padding) of the 2L layout: noised then clean, positions repeated."""
    positions = torch.arange(x0.shape[1], device=x0.device).expand_as(x0)  # training rows are right-padded
    return torch.cat([x_t, x0], 1), torch.cat([positions, positions], 1), torch.cat([padding, padding], 1)


def two_l_visible(length: int, block_size: int):
    """The 2L mask as a transformers mask function: may query q see key k (both in [0, 2L))?"""
    def visible(batch_idx, head_idx, q_idx, kv_idx):
        q_clean, kv_clean = q_idx >= length, kv_idx >= length
        q_block = (q_idx - q_clean * length) // block_size
        kv_block = (kv_idx - kv_clean * length) // block_size
        same_noised = ~q_clean & ~kv_clean & (q_block == kv_block)
        earlier_clean = kv_clean & ((kv_block < q_block) | (q_clean & (kv_block == q_block)))
        return same_noised | earlier_clean

    return visible


def documents(x0: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(rows, L) document index of each token of packed rows (documents joined by EOS; an EOS ends its own)."""
    ends = (x0 == eos_token_id).long()
    return ends.cumsum(1) - ends


def two_l_attention_mask(model, padding: torch.Tensor, block_size: int, document_ids: torch.Tensor | None = None):
    """The `attention_mask` for the 2L forward (`padding` is the 2L padding mask from `two_l_inputs`), built by
    transformers' own mask builders as `annealing` does, so eager gets an additive mask and sdpa a boolean one.
    With `document_ids` ((rows, L), from `documents`), packed documents never attend to each other."""
    config = model.config.text_config
    impl = config._attn_implementation
    if impl not in BLOCK_IMPLEMENTATIONS:
        raise AdaptError(f"attention implementation '{impl}' cannot take the block-diffusion mask; load the model "
                         f"with attn_implementation in {BLOCK_IMPLEMENTATIONS}")
    rows, length = padding.shape[0], padding.shape[1] // 2
    visible = two_l_visible(length, block_size)
    window = getattr(config, "sliding_window", None)

    def full(batch_idx, head_idx, q_idx, kv_idx):
        ok = visible(batch_idx, head_idx, q_idx, kv_idx)
        if document_ids is not None:
            ok = ok & (document_ids[batch_idx, q_idx % length] == document_ids[batch_idx, kv_idx % length])
        return ok

    def sliding(batch_idx, head_idx, q_idx, kv_idx):  # the window counts positions, which repeat in 2L
        distance = q_idx % length - kv_idx % length
        return full(batch_idx, head_idx, q_idx, kv_idx) & (distance < window) & (-distance < window)

    causal = copy.copy(config)
    causal.is_causal = True  # (causal | visible) & visible = visible, under the builders of every 5.x release
    kwargs = dict(config=causal, inputs_embeds=torch.empty(rows, 2 * length, 0, dtype=model.dtype,
                                                           device=padding.device),
                  attention_mask=padding, position_ids=torch.arange(2 * length, device=padding.device)[None])

    def build(kind):
        fn, builder = (sliding, create_sliding_window_causal_mask) if kind == "sliding_attention" else (
            full, create_causal_mask)
        return causal_mask(builder, **kwargs, or_mask_function=fn, and_mask_function=fn, allow_is_causal_skip=False)

    if check_architecture(config).layer_type_masks:
        return {kind: build(kind) for kind in set(config.layer_types)}
    return build("sliding_attention" if window is not None else "full_attention")


def canvas_logits(logits: torch.Tensor, length: int, block_size: int, shift: bool) -> torch.Tensor:
    """(rows, L, V) from the 2L forward's (rows, 2L, V): position j's logit as inference computes it. It is the
    noised half's, except, under shift, at a block's last position, whose logit predicts the next block's first
    token from the clean block: there it is the clean half's."""
    if not shift:
        return logits[:, :length]
    last = (torch.arange(length, device=logits.device) % block_size) == block_size - 1
    return torch.where(last[None, :, None], logits[:, length:], logits[:, :length])
