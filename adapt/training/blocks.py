"""Block diffusion in training (BD3-LM, Fast-dLLM v2, SDAR, LLaDA 2.0; REFERENCE §10): the block-size schedule,
one t per block, and packed documents kept apart.

Text is cut into blocks of B tokens, generated left to right; inside a block, tokens are denoised in parallel. A
training step sees every block as inference will, in one forward over the "2L" layout (the noised sequence x_t
followed by the clean x_0, positions repeated), built by the remote code's `two_l_layout`
(`model/block_masked_diffusion.py`), which the checkpoint's users get too:
- a noised block sees itself (both ways) and the clean blocks before it;
- a clean block sees itself and the clean blocks before it, never a noised token.

Shift (Fast-dLLM v2): the logit at j−1 predicts token j. Inside a block that logit is the noised half's; for the
first token of a block it is the last clean position of the block before (`canvas_index`), so the loss applies
shift exactly as the sampler and the likelihood do. At B = 1 every logit comes from the clean half under a
causal mask: the AR parent, exactly.
"""

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import AdaptError
from ..model.block_masked_diffusion import check_block_implementation
from ..ranges import FieldError, check_ranges


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


def documents(x0: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(rows, L) document index of each token of packed rows (documents joined by EOS; an EOS ends its own)."""
    ends = (x0 == eos_token_id).long()
    return ends.cumsum(1) - ends


def check_block_attention(model):
    """One clear error, before a step, for an attention implementation that cannot take the block mask."""
    try:
        check_block_implementation(model.config.text_config)
    except ValueError as e:
        raise AdaptError(str(e)) from None
