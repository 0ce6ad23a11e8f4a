"""What a block-diffusion model kept of its causal parent (issue 26, REFERENCE §15), on packed held-out rows (token 0
of each row is context, as in `likelihood`); training's validation and `dlm-adapt eval --metrics forgetting` call
`forgetting`.

- `block_start_nll`: the tokens that start a block are predicted from the clean blocks before them alone (with
  shift, by the clean stream's last position of the block before): the same context the AR parent has. Their NLL
  next to the parent's on the same tokens measures forgetting, free of the diffusion bound's slack.
- `masked_per_block`: cross-entropy per masked token with exactly l of every block's B tokens masked, l = 1..B
  (the terms the block ELBO averages over l: l = 1 is easier than AR, l = B multi-token prediction).
- `ar_nll` and `ar_block_start_nll`: the checkpoint as its causal self (`is_causal=True`): its AR mode, exact
  when the clean stream is token-causal (`clean_attention: causal`; the parent itself before training).
[MASK] is never a prediction, as in the ELBO.
"""

import torch
import torch.nn.functional as F

from ..errors import AdaptError
from ..model.block_masked_diffusion import clean_attention_of, resolve_block_size, two_l_logits
from .likelihood import model_device


def _ce(logits, ids, mask_id):
    """(rows, L−1) CE of token i + 1 from the logit at i, [MASK] excluded."""
    logits = logits[:, :-1].float().clone()
    if mask_id is not None and mask_id < logits.shape[-1]:
        logits[..., mask_id] = -torch.inf
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(ids.shape[0], -1)


@torch.no_grad()
def forgetting(model, sequences: torch.Tensor, *, batch_size: int = 16, seed: int = 0, block_size: int | None = None,
               parent=None) -> dict:
    """The metrics above for a block-diffusion checkpoint with shift, in nats per token; with `parent` (a causal
    LM on the same tokenizer) also `parent_nll` and `parent_block_start_nll`, and `block_start_change` (model −
    parent: > 0 is forgetting)."""
    config = model.config
    block_size = resolve_block_size(config, block_size, needed_by="the forgetting metrics (block-start tokens)")
    if not getattr(config, "shift", False):
        raise AdaptError("the forgetting metrics read block starts from the clean stream, which needs shift")
    mask_id, device = config.mask_token_id, model_device(model)
    ids = sequences if isinstance(sequences, torch.Tensor) else sequences.input_ids
    length = ids.shape[1]
    start = (torch.arange(1, length) % block_size == 0)  # token i + 1 starts a block
    g = torch.Generator().manual_seed(seed)
    sums = {name: 0.0 for name in ("block_start", "ar", "ar_block_start", "parent", "parent_block_start")}
    per_l, count_l = torch.zeros(block_size + 1, dtype=torch.float64), torch.zeros(block_size + 1, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, ids.shape[0], batch_size):
            x = ids[lo:lo + batch_size].to(device)
            ce = _ce(two_l_logits(model, torch.full_like(x, mask_id), x, block_size=block_size), x, mask_id)
            sums["block_start"] += float(ce[:, start].double().sum())
            ce = _ce(model(input_ids=x, is_causal=True).logits, x, mask_id)
            sums["ar"] += float(ce.double().sum())
            sums["ar_block_start"] += float(ce[:, start].double().sum())
            if parent is not None:
                ce = _ce(parent(input_ids=x).logits, x, None)
                sums["parent"] += float(ce.double().sum())
                sums["parent_block_start"] += float(ce[:, start].double().sum())
            u = torch.rand(x.shape, generator=g).to(device)
            u[:, 0] = 2.0  # context, never masked
            blocks = -(-length // block_size) * block_size
            ranks = F.pad(u, (0, blocks - length), value=3.0).view(len(x), -1, block_size).argsort(-1).argsort(-1)
            ranks = ranks.view(len(x), -1)[:, :length]
            for l in range(1, block_size + 1):
                masked = (ranks < l) & (u < 2)
                ce = _ce(two_l_logits(model, x.masked_fill(masked, mask_id), x, block_size=block_size), x, mask_id)
                per_l[l] += float(ce[masked[:, 1:]].double().sum())
                count_l[l] += int(masked[:, 1:].sum())
    finally:
        model.train(was_training)
    starts, tokens = int(start.sum()) * ids.shape[0], (length - 1) * ids.shape[0]
    out = {"block_size": block_size, "clean_attention": clean_attention_of(config),
           "block_start_nll": sums["block_start"] / starts, "block_start_tokens": starts,
           "masked_per_block": {str(l): float(per_l[l] / count_l[l].clamp_min(1)) for l in range(1, block_size + 1)},
           "ar_nll": sums["ar"] / tokens, "ar_block_start_nll": sums["ar_block_start"] / starts, "tokens": tokens}
    if parent is not None:
        out.update(parent_nll=sums["parent"] / tokens, parent_block_start_nll=sums["parent_block_start"] / starts,
                   block_start_change=(sums["block_start"] - sums["parent_block_start"]) / starts)
    return out
