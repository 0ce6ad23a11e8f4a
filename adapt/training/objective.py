"""The masked-diffusion (absorbing-state) objective: sample t, mask, cross-entropy on masked positions × 1/t.

One t per sequence, t = (1 − ε)·u + ε. Each maskable token (not prompt, not padding; never position 0 when
`shift`, since nothing predicts it) becomes [MASK] with probability t. With `shift`, the logit at i−1 predicts
the token at i, as in the AR model the weights come from. See REFERENCE §3–§4.
"""


import torch
import torch.nn.functional as F

from ..config.diffusion import ObjectiveConfig


def sample_t(batch: int, cfg: ObjectiveConfig, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    u = torch.rand(batch, generator=generator, device=device)
    if cfg.t_sampling == "antithetic":
        u = (u[:1] + torch.arange(batch, device=device) / batch) % 1.0
    return (1 - cfg.eps) * u + cfg.eps


def per_position(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, 1) or (rows, L): one t per row, or per position (block diffusion draws one per block)."""
    return t[:, None] if t.dim() == 1 else t


def corrupt(x0, maskable, t, mask_id: int, u: torch.Tensor):
    """x_t: each maskable token replaced by `mask_id` where its uniform draw u < t. Returns (x_t, masked)."""
    masked = (u < per_position(t)) & maskable
    return x0.masked_fill(masked, mask_id), masked


def cart_weights(masked: torch.Tensor, maskable: torch.Tensor, p: float) -> torch.Tensor:
    """w[b, n] = ½ Σ_{i clean, i ≠ n} p(1 − p)^(|n − i| − 1), as one convolution over the sequence."""
    length = masked.shape[1]
    d = torch.arange(-(length - 1), length, device=masked.device).abs()
    kernel = torch.where(d > 0, p * (1 - p) ** (d - 1).clamp_min(0).float(), torch.zeros((), device=d.device))
    clean = (maskable & ~masked).float()[:, None, :]
    return 0.5 * F.conv1d(clean, kernel.flip(0)[None, None], padding=length - 1)[:, 0]


def _weighted_ce(logits, x0, masked, maskable, t, cfg: ObjectiveConfig, shift: bool, mask_token_id=None):
    """(weighted CE per position, masked, maskable), aligned so position i is the prediction of token i."""
    t = per_position(t)
    if shift:  # logit i−1 predicts token i
        logits, x0, masked, maskable = logits[:, :-1], x0[:, 1:], masked[:, 1:], maskable[:, 1:]
        t = t[:, 1:] if t.shape[1] > 1 else t
    # flattened (N, V) layout: the (B, V, L) transpose makes cross_entropy about 2x slower on CPU
    flat, target = logits.float().flatten(0, 1), x0.flatten()
    ce = F.cross_entropy(flat, target, reduction="none")
    if mask_token_id is not None:
        # a clean token is never [MASK]: its probability is renormalised away (MDLM's SUBS parameterisation), as
        # the sampler forbids it. CE over the other tokens is CE + log(1 − p_mask), with no copy of the logits.
        log_normaliser = ce + flat.gather(1, target[:, None])[:, 0]
        p_mask = (flat[:, mask_token_id] - log_normaliser).exp().clamp(max=1 - 1e-6)
        ce = ce + torch.log1p(-p_mask)
    ce = ce.view_as(x0)
    if cfg.weighting == "cart":
        weight = cart_weights(masked, maskable, cfg.cart_p)
    else:
        weight = (1.0 / t).expand_as(ce)
    return ce * weight * masked, masked, maskable


def diffusion_loss(logits, x0, masked, maskable, t, cfg: ObjectiveConfig, shift: bool,
                   mask_token_id: int | None = None) -> torch.Tensor:
    """Weighted cross-entropy on masked positions, normalised as `cfg.normalization` says. With `mask_token_id`,
    the [MASK] token is excluded from the predicted distribution (training and the likelihood pass it)."""
    if cfg.normalization == "sequence":
        return sequence_losses(logits, x0, masked, maskable, t, cfg, shift, mask_token_id).mean()
    per_token, masked, maskable = _weighted_ce(logits, x0, masked, maskable, t, cfg, shift, mask_token_id)
    if cfg.normalization == "masked":
        return per_token.sum() / masked.sum().clamp_min(1)
    return per_token.sum() / maskable.sum().clamp_min(1)


def sequence_losses(logits, x0, masked, maskable, t, cfg: ObjectiveConfig, shift: bool,
                    mask_token_id: int | None = None) -> torch.Tensor:
    """(batch,) weighted CE of each sequence divided by its maskable tokens: with `inverse_t`, one Monte-Carlo
    draw of each sequence's ELBO in nats per token (what `adapt.evaluate` averages)."""
    per_token, _, maskable = _weighted_ce(logits, x0, masked, maskable, t, cfg, shift, mask_token_id)
    return per_token.sum(1) / maskable.sum(1).clamp_min(1)


def first_loss_column(maskable: torch.Tensor, shift: bool) -> int:
    """The first sequence position whose logit the loss reads, over all rows (0 when no token is maskable).

    SFT rows start with a prompt that is never noised; the LM head and the cross-entropy are then computed only
    from this column on (`logits_to_keep`), and the loss sees the same terms: with `shift` the logit at i−1
    predicts token i, so the column before the first maskable token is the first one needed."""
    columns = maskable.any(0).nonzero()
    if columns.numel() == 0:
        return 0
    return max(int(columns[0, 0]) - int(shift), 0)


def position_exponents(length: int, block_size: int, strength: float, device=None) -> torch.Tensor:
    """(L,) γ_j of `ObjectiveConfig.position_masking`: exp(c·(½ − j/(B−1))) for position j = i mod B of a block."""
    j = torch.arange(length, device=device) % block_size
    return torch.exp(strength * (0.5 - j / max(block_size - 1, 1)))


def position_schedule(t: torch.Tensor, gamma: torch.Tensor, complement: bool = False):
    """(masking probability, ELBO weight's t) per position for block time `t` (rows, L) under the per-token
    schedule p_j(t) = t^γ_j: the weight of a masked token is p_j'(t)/p_j(t) = γ_j/t, passed as the t of `1/t`
    (t/γ_j). The complement mask (masked with probability 1 − t^γ_j, a schedule in 1 − t) weighs
    γ_j t^(γ_j−1)/(1 − t^γ_j). With γ = 1 these are (t, t) and (1 − t, 1 − t)."""
    p = t ** gamma
    if complement:
        return 1 - p, (1 - p) / (gamma * t ** (gamma - 1))
    return p, t / gamma


def noised_batch(x0, maskable, cfg: ObjectiveConfig, mask_id: int, shift: bool, generator=None,
                 rows: slice | None = None, total_rows: int | None = None, block_size: int | None = None):
    """Everything one training step needs: (x_t, x0, masked, maskable, t), doubled with complements if asked.
    With `block_size`, t is (rows, L): one t per block (`blocks.block_t`); else (rows,). With
    `cfg.position_masking` (block diffusion), t is the per-position t of the ELBO weight (`position_schedule`).

    In data parallel training each process passes `total_rows` (the global batch) and its `rows`: the noise is
    drawn for the whole global batch and sliced, so it does not depend on the number of processes."""
    if shift:
        maskable = maskable.clone()
        maskable[:, 0] = False
    total = total_rows or x0.shape[0]
    device = generator.device if generator is not None else x0.device
    if block_size is None:
        t = sample_t(total, cfg, generator, device)
    else:
        from .blocks import block_t

        t = block_t(total, x0.shape[1], block_size, cfg.eps, generator, device)
    u = torch.rand((total, x0.shape[1]), generator=generator, device=t.device)
    if rows is not None:
        t, u = t[rows], u[rows]
    t, u = t.to(x0.device), u.to(x0.device)
    if cfg.position_masking and block_size is not None and t.dim() == 2:
        gamma = position_exponents(x0.shape[1], block_size, cfg.position_masking, x0.device)
        p, weight_t = position_schedule(t, gamma)
        x_t, masked = corrupt(x0, maskable, p, mask_id, u)
        complement_t = position_schedule(t, gamma, complement=True)[1]
        t = weight_t
    else:
        x_t, masked = corrupt(x0, maskable, t, mask_id, u)
        complement_t = 1 - t
    if cfg.complementary:
        other = maskable & ~masked
        x_t = torch.cat([x_t, x0.masked_fill(other, mask_id)])
        x0, masked, maskable = torch.cat([x0, x0]), torch.cat([masked, other]), torch.cat([maskable, maskable])
        t = torch.cat([t, complement_t.clamp_min(cfg.eps)])
    return x_t, x0, masked, maskable, t
