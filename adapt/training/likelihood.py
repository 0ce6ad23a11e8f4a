"""Likelihood of text under a diffusion checkpoint (the Monte-Carlo ELBO, an upper bound on its NLL) and under a
causal LM (the exact NLL). Both score the same tokens of a packed sequence: all but the first, which is context
(see `adapt.evaluate`). Training's validation loss, `dlm-adapt eval` and the benchmarks call these."""

import math

import torch
import torch.nn.functional as F

from .batch import Batch, as_batch
from ..errors import AdaptError
from ..model.block_masked_diffusion import resolve_block_size, two_l_logits
from ..model.configuration_masked_diffusion import SHIFT_DEFAULT
from .objective import ObjectiveConfig, sequence_losses


@torch.no_grad()
def diffusion_elbo(model, sequences: "torch.Tensor | Batch", *, mc_samples: int = 16, batch_size: int = 16,
                   seed: int = 0, block_size: int | None = None) -> dict:
    """Monte-Carlo ELBO (an upper bound on the NLL) in nats per scored token.

    `sequences` are packed text, a (rows, L) tensor of token ids, scored on tokens 1..L−1 with token 0 as context;
    or an `adapt.batch.Batch`, scored on its maskable tokens (SFT rows: the answer tokens only) from 1 on.

    Each draw picks a number of masked tokens l uniform on 1..N (N = the row's scored tokens), masks a uniform
    subset of that size and scores (1/l)·Σ CE over it. This is the continuous-time 1/t ELBO with t integrated out
    (∫ Binomial(N, t)(l)/t dt = 1/l; LLaDA's estimator), with lower variance, and exact per draw for a model
    whose predictions ignore the context. The l's are low-discrepancy: draw k of row r uses
    u = (k + (o_k + r/R) mod 1)/K, stratified over the K draws of a row and a shifted lattice across rows
    (the antithetic t of MDLM); with K = 1 that is the one-draw-per-row estimate used during training.
    Rows are weighted by their scored tokens, so the result is per token, not per row.

    Block diffusion (`block_size`, default the checkpoint's `config.block_size`): the bound is a sum over
    diffusion blocks, each one's masked-diffusion bound given the clean blocks before it, all blocks of a row in
    one 2L forward (`adapt.training.blocks`). Each block draws its own mask count l uniform on 1..N_block, stratified as
    above across (row, block) pairs. At block size 1 every token is masked with its clean prefix visible: the
    exact AR NLL.

    `stderr` is the Monte-Carlo standard error for this fixed text, estimated as stratified sampling's is: draw k
    of a row is the only one in its stratum k, so adjacent strata are paired ("collapsed strata") and each pair's
    squared difference estimates the two strata's variances. It measures the spread the stratification leaves
    (the within-row variance of the K draws taken as independent overstated the real error 3.5–6.1× on a
    trained stories260K at block sizes 2 and 4, and about 10× on the converted one in `benchmarks/elbo_stderr.py`,
    where this estimate is 1.1–1.9× the real spread); it stays an overestimate, since paired strata differ in
    mean and the lattice across rows is ignored.
    """
    values, scored, block_size = elbo_draws(model, sequences, mc_samples=mc_samples, batch_size=batch_size, seed=seed,
                                            block_size=block_size)
    k_draws = values.shape[1]
    weight = scored.double() / scored.sum()
    elbo = (values.mean(1) * weight).sum().item()
    stderr = (stratified_variance(values) * weight ** 2).sum().sqrt().item() if k_draws > 1 else None
    return {"elbo_nats_per_token": elbo, "ppl_bound": exp_or_inf(elbo), "stderr": stderr, "tokens": int(scored.sum()),
            "sequences": values.shape[0], "mc_samples": k_draws, "seed": seed, "block_size": block_size}


def stratified_variance(values: torch.Tensor) -> torch.Tensor:
    """(rows,) variance of each row's mean over K ≥ 2 draws, draw k from stratum k (collapsed strata): Σ over
    pairs (2i, 2i+1) of (v_2i − v_2i+1)² / K²; with K odd the last stratum gets the pairs' mean variance."""
    k_draws = values.shape[1]
    pairs = values[:, : k_draws - k_draws % 2].view(values.shape[0], -1, 2)
    squares = (pairs[..., 0] - pairs[..., 1]).pow(2)
    total = squares.sum(1) + (squares.mean(1) / 2 if k_draws % 2 else 0)
    return total / k_draws ** 2


@torch.no_grad()
def elbo_draws(model, sequences: "torch.Tensor | Batch", *, mc_samples: int = 16, batch_size: int = 16, seed: int = 0,
               block_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """The draws behind `diffusion_elbo`: (values (rows, K) in nats per scored token of each row's draw, scored
    tokens per row (rows,), the block size used). A row's bound on its NLL is values.mean(1) · scored."""
    config = model.config
    mask_id, shift = getattr(config, "mask_token_id", None), bool(getattr(config, "shift", SHIFT_DEFAULT))
    if mask_id is None:
        raise AdaptError("the model has no mask_token_id: not a diffusion model")
    try:
        batch = as_batch(sequences)
    except TypeError as e:
        raise AdaptError(f"diffusion_elbo: {e}") from None
    ids, attention = batch.input_ids, batch.attention_mask
    scorable = (torch.ones_like(ids, dtype=torch.bool) if batch.maskable is None else batch.maskable.clone())
    scorable[:, 0] = False  # nothing predicts position 0 under shift (and for SFT it is prompt anyway)
    n_rows, length = ids.shape
    if length < 2:
        raise AdaptError("sequences need at least 2 tokens (the first is context)")
    if mc_samples < 1 or batch_size < 1:
        raise AdaptError("mc_samples and batch_size must be at least 1")
    scored = scorable.sum(1)
    if (scored == 0).any():
        raise AdaptError("a row has no tokens to score")
    block_size = resolve_block_size(config, block_size)
    if block_size is not None:
        from .blocks import check_block_attention

        check_block_attention(model)  # once, before any forward: one clear error for flash/flex attention
    # a "segment" is what draws one mask count: the whole row, or one diffusion block of it
    segment = torch.zeros(length, dtype=torch.long) if block_size is None else torch.arange(length) // block_size
    n_seg = int(segment[-1]) + 1
    per_segment = torch.zeros(n_rows, n_seg, dtype=torch.long).index_add_(1, segment, scorable.long())
    k_draws = mc_samples
    g = torch.Generator().manual_seed(seed)
    offsets = torch.rand(k_draws, generator=g, dtype=torch.float64)
    cells = n_rows * n_seg
    lattice = (offsets[None, :] + torch.arange(cells, dtype=torch.float64)[:, None] / cells) % 1.0
    u = ((torch.arange(k_draws, dtype=torch.float64)[None, :] + lattice) / k_draws).view(n_rows, n_seg, k_draws)
    size = per_segment[:, :, None]
    counts = torch.minimum((u * size).long(), (size - 1).clamp_min(0)) + 1  # (rows, segments, K): 1..N_segment
    counts = counts.masked_fill(size == 0, 0)  # a segment with nothing to score (block 0 at B = 1) masks nothing
    device = model_device(model)
    cfg = ObjectiveConfig(weighting="inverse_t")
    values = torch.empty(n_rows, k_draws, dtype=torch.float64)
    noise, drawn = {}, 0  # subset draws made row by row: results do not depend on batch_size

    was_training = model.training
    model.eval()
    try:
        for start in range(0, n_rows * k_draws, batch_size):
            rows = torch.arange(start, min(start + batch_size, n_rows * k_draws))
            b, k = rows // k_draws, rows % k_draws
            while drawn <= int(b[-1]):
                noise[drawn] = torch.rand((k_draws, length), generator=g)
                drawn += 1
            for old in [key for key in noise if key < int(b[0])]:
                del noise[old]
            draws = torch.stack([noise[int(bi)][int(ki)] for bi, ki in zip(b, k)])
            draws = draws.masked_fill(~scorable[b], 2.0)  # unscorable positions rank last, never chosen
            n = counts[b, :, k][:, segment]  # each position's segment's mask count
            masked = (_segment_ranks(draws, segment, n_seg) < n).to(device)  # the n smallest: a uniform n-subset
            x0 = ids[b].to(device)
            mask = attention[b].to(device) if attention is not None else None
            # a segment with nothing to score masks nothing; t = 1 keeps its zero weight finite (0 · 1/t)
            t = (n.double() / per_segment[b][:, segment].clamp_min(1)).masked_fill(n == 0, 1.0).float().to(device)
            logits = _denoise(model, x0.masked_fill(masked, mask_id), x0, mask, block_size)
            values[b, k] = sequence_losses(logits, x0, masked, scorable[b].to(device), t, cfg, shift,
                                           mask_id).double().cpu()
    finally:
        model.train(was_training)
    return values, scored, block_size


def _segment_ranks(draws: torch.Tensor, segment: torch.Tensor, n_seg: int) -> torch.Tensor:
    """Rank of each draw within its segment (0 = smallest), for rows of draws in [0, 1] (2.0: never chosen)."""
    keyed = draws.double() + 4.0 * segment.double()  # segments sort apart, in order
    ranks = keyed.argsort(1).argsort(1)
    starts = torch.zeros(n_seg, dtype=torch.long).index_add_(0, segment, torch.ones_like(segment)).cumsum(0)
    return ranks - (starts - torch.bincount(segment, minlength=n_seg))[segment]


def _denoise(model, x_t, x0, padding, block_size):
    """Logits at every position of x_t as inference computes them: one forward over the canvas, or for block
    diffusion one 2L forward whose earlier blocks are clean (`adapt.training.blocks`)."""
    if block_size is None:
        return model(input_ids=x_t, attention_mask=padding).logits
    return two_l_logits(model, x_t, x0, padding, block_size)


@torch.no_grad()
def token_scores(model, batch: Batch, *, causal: bool = False, block_size: int | None = None,
                 batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a diffusion checkpoint's `batch`, over its maskable tokens (from position 1 on): (sum of log p,
    whether every one is the model's argmax). [MASK] is excluded from the distribution, as in the ELBO.

    `causal=True`: one clean forward with the decoder's causal mask (`is_causal`); under shift token i is
    predicted from tokens < i, the exact AR likelihood of the checkpoint as its causal self.
    Otherwise only the argmax is exact and the log p is not computed (zeros; the ELBO is the likelihood): each
    scored token is masked alone, everything else clean (later tokens included, where attention reaches them),
    and compared with the argmax at its position. Block diffusion (`block_size`, default the checkpoint's) reads
    it from the 2L forward, as the ELBO does; at block size 1 it is the AR argmax."""
    config = model.config
    mask_id, shift = config.mask_token_id, bool(getattr(config, "shift", SHIFT_DEFAULT))
    ids, attention = batch.input_ids, batch.attention_mask
    scored = batch.maskable.clone() if batch.maskable is not None else torch.ones_like(ids, dtype=torch.bool)
    scored[:, 0] = False
    device = model_device(model)
    if not causal:
        block_size = resolve_block_size(config, block_size)
    was_training = model.training
    model.eval()
    logp = torch.zeros(ids.shape[0], dtype=torch.float64)
    hit = torch.ones(ids.shape[0], dtype=torch.bool)
    try:
        if causal:
            for lo in range(0, ids.shape[0], batch_size):
                x0 = ids[lo:lo + batch_size].to(device)
                mask = attention[lo:lo + batch_size].to(device) if attention is not None else None
                lp, top = _aligned_scores(model(input_ids=x0, attention_mask=mask, is_causal=True).logits, x0, shift,
                                          mask_id)
                rows = scored[lo:lo + batch_size].to(device)
                logp[lo:lo + batch_size] = (lp * rows).sum(1).double().cpu()
                hit[lo:lo + batch_size] = ((top == x0) | ~rows).all(1).cpu()
            return logp, hit
        row, pos = scored.nonzero(as_tuple=True)  # one forward row per scored token, masked alone
        for lo in range(0, row.numel(), batch_size):
            r, p = row[lo:lo + batch_size], pos[lo:lo + batch_size]
            x0 = ids[r].to(device)
            alone = torch.zeros_like(x0, dtype=torch.bool)
            alone[torch.arange(r.numel()), p.to(device)] = True
            mask = attention[r].to(device) if attention is not None else None
            _, top = _aligned_scores(_denoise(model, x0.masked_fill(alone, mask_id), x0, mask, block_size), x0, shift,
                                     mask_id)
            ok = top[torch.arange(r.numel()), p.to(device)] == x0[torch.arange(r.numel()), p.to(device)]
            hit[r[~ok.cpu()]] = False
    finally:
        model.train(was_training)
    return logp, hit


def _aligned_scores(logits, x0, shift: bool, mask_id: int):
    """(log p of each token, argmax at each position), position i about token i; [MASK] never predicted. With
    shift the logit at i−1 predicts token i (as in `adapt.objective`); position 0 then has no prediction."""
    logits = logits.float().clone()
    logits[..., mask_id] = -math.inf
    if shift:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)  # position 0: a placeholder, never scored
    lp = logits.log_softmax(-1).gather(-1, x0[..., None])[..., 0]
    return lp, logits.argmax(-1)


@torch.no_grad()
def causal_nll(model, sequences: torch.Tensor, *, batch_size: int = 16) -> dict:
    """Exact NLL of a causal LM in nats per token over tokens 1..L−1 of each sequence (the ELBO's tokens)."""
    nll = _token_nll(model, sequences, batch_size)
    value = nll.double().mean().item()
    return {"nll_nats_per_token": value, "ppl": exp_or_inf(value), "stderr": 0.0, "tokens": nll.numel(),
            "sequences": sequences.shape[0]}


def nll_after(model, ids: torch.Tensor, start: int, batch_size: int) -> float:
    """Mean NLL per token of tokens start..L−1 of each row under a causal LM (each given everything before it)."""
    return _token_nll(model, ids, batch_size)[:, start - 1:].double().mean().item()


@torch.no_grad()
def _token_nll(model, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(rows, L−1) NLL of token j+1 given tokens 0..j under a causal LM."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, ids.shape[0], batch_size):
            x = ids[start:start + batch_size].to(device)
            logits = model(input_ids=x).logits[:, :-1].float()
            out.append(F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
                       .view(x.shape[0], -1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def exp_or_inf(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf
