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

With `separator` (the token id `training.data.document_separator` puts between packed documents), `within_documents`
repeats the NLLs without the separator tokens and the token after each. There the parent predicts a document
boundary from the previous document alone, and pays dearly when the separator is one it never saw between
documents (benchmarks/separator_cost.py: SmolLM2-Instruct 12.5 nats at each `<|endoftext|>`; stories260K, pretrained
on BOS-first stories, 4.25 at each BOS and 3.58 after it); an adaptation trained on that packing learns the
boundaries within a few steps, and counted in, that gain reads as knowledge kept and hides forgetting elsewhere.
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


def within_documents(ids: torch.Tensor, separator: int) -> torch.Tensor:
    """(rows, L−1) bool: target i + 1 of each row is neither the separator nor the token right after it (the input
    token i is not the separator, row token 0 included)."""
    return (ids[:, 1:] != separator) & (ids[:, :-1] != separator)


class _Tally:
    """Per-token NLL sums over the targets a `keep` mask selects; block starts are those that also start a block."""

    def __init__(self):
        self.sums = dict.fromkeys(("block_start", "ar", "ar_block_start", "parent", "parent_block_start"), 0.0)
        self.tokens = self.starts = 0
        self.changes = []  # per block start: model − parent, for the paired standard error

    def add(self, keep, start, block, ar, parent):
        starts = keep & start
        self.tokens, self.starts = self.tokens + int(keep.sum()), self.starts + int(starts.sum())
        self.sums["block_start"] += float(block[starts].double().sum())
        self.sums["ar"] += float(ar[keep].double().sum())
        self.sums["ar_block_start"] += float(ar[starts].double().sum())
        if parent is not None:
            self.sums["parent"] += float(parent[keep].double().sum())
            self.sums["parent_block_start"] += float(parent[starts].double().sum())
            self.changes.append((block - parent)[starts].double())

    def summary(self, parent: bool) -> dict:
        """Means per token; NaN where nothing was selected (0 would read as a parent kept perfectly)."""
        s, n, m = self.sums, self.tokens or float("nan"), self.starts or float("nan")
        out = {"block_start_nll": s["block_start"] / m, "block_start_tokens": self.starts, "ar_nll": s["ar"] / n,
               "ar_block_start_nll": s["ar_block_start"] / m, "tokens": self.tokens}
        if parent:
            d = torch.cat(self.changes) if self.changes else torch.zeros(0, dtype=torch.float64)
            out.update(parent_nll=s["parent"] / n, parent_block_start_nll=s["parent_block_start"] / m,
                       block_start_change=(s["block_start"] - s["parent_block_start"]) / m,
                       block_start_change_stderr=float(d.std() / len(d) ** 0.5) if len(d) > 1 else float("nan"))
        return out


@torch.no_grad()
def forgetting(model, sequences: torch.Tensor, *, batch_size: int = 16, seed: int = 0, block_size: int | None = None,
               parent=None, separator: int | None = None) -> dict:
    """The metrics above for a block-diffusion checkpoint with shift, in nats per token; with `parent` (a causal
    LM on the same tokenizer) also `parent_nll` and `parent_block_start_nll`, and `block_start_change` (model −
    parent: > 0 is forgetting) with its standard error over block starts (`block_start_change_stderr`, paired: the
    same tokens); with `separator`, the same within documents."""
    config = model.config
    block_size = resolve_block_size(config, block_size, needed_by="the forgetting metrics (block-start tokens)")
    if not getattr(config, "shift", False):
        raise AdaptError("the forgetting metrics read block starts from the clean stream, which needs shift")
    mask_id, device = config.mask_token_id, model_device(model)
    ids = sequences if isinstance(sequences, torch.Tensor) else sequences.input_ids
    length = ids.shape[1]
    start = (torch.arange(1, length) % block_size == 0)  # token i + 1 starts a block
    g = torch.Generator().manual_seed(seed)
    whole, inside = _Tally(), _Tally()
    per_l, count_l = torch.zeros(block_size + 1, dtype=torch.float64), torch.zeros(block_size + 1, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, ids.shape[0], batch_size):
            x = ids[lo:lo + batch_size].to(device)
            block = _ce(two_l_logits(model, torch.full_like(x, mask_id), x, block_size=block_size), x, mask_id).cpu()
            ar = _ce(model(input_ids=x, is_causal=True).logits, x, mask_id).cpu()
            own = None if parent is None else _ce(parent(input_ids=x).logits, x, None).cpu()
            whole.add(torch.ones_like(block, dtype=torch.bool), start, block, ar, own)
            if separator is not None:
                inside.add(within_documents(x, separator).cpu(), start, block, ar, own)
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
    out = {"block_size": block_size, "clean_attention": clean_attention_of(config), **whole.summary(parent is not None),
           "masked_per_block": {str(l): float(per_l[l] / count_l[l].clamp_min(1)) for l in range(1, block_size + 1)}}
    if separator is not None:
        out["within_documents"] = {"excluded": "the separator tokens and the token after each",
                                   "separator_id": separator, **inside.summary(parent is not None)}
    return out
