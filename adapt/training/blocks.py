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

import torch

from ..errors import AdaptError
from ..model.block_masked_diffusion import check_block_implementation


def block_t(rows: int, length: int, block_size: int, eps: float, generator=None, device=None) -> torch.Tensor:
    """(rows, length) noise levels, one per block: a shifted lattice across a row's blocks, so each row's blocks
    cover (0, 1) evenly while each block's t stays uniform; t = (1 − eps)·u + eps as in `objective.sample_t`."""
    n = math.ceil(length / block_size)
    offset = torch.rand(rows, 1, generator=generator, device=device)
    u = (offset + torch.arange(n, device=offset.device) / n) % 1.0
    u = u[:, torch.randperm(n, generator=generator, device=device)]  # no block position always gets the low t
    t = (1 - eps) * u + eps
    return t.repeat_interleave(block_size, dim=1)[:, :length]


def documents(x0: torch.Tensor, separator: tuple[str, int]) -> torch.Tensor:
    """(rows, L) document index of each token of packed rows; `separator` as `data.document_separator` gives it:
    ("bos", id), a BOS starts its own document, or ("eos", id), an EOS ends its own."""
    kind, token = separator
    marks = (x0 == token).long()
    return marks.cumsum(1) - (marks if kind == "eos" else 0)


def check_block_attention(model):
    """One clear error, before a step, for an attention implementation that cannot take the block mask."""
    try:
        check_block_implementation(model.config.text_config)
    except ValueError as e:
        raise AdaptError(str(e)) from None
