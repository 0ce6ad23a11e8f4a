"""Distillation losses between a teacher's and a student's next-token distributions, and what they say about
speculative decoding (Leviathan et al. 2023; Uno, REFERENCE §14).

A draft x ~ q is kept by speculative sampling with probability min(1, p(x)/q(x)), so the probability that a drafted
position is accepted is Σ_x q(x) min(1, p(x)/q(x)) = Σ_x min(p(x), q(x)) = 1 − TV(p, q). Training the drafter on
TV therefore raises acceptance directly; KL(p‖q) and the cross-entropy on the teacher's argmax (what greedy
verification checks) are the options. Every function takes logits (..., V) and returns one value per position
(...); p and q are the softmax of logits ÷ `temperature`. Logits of -inf (a token neither model may produce, such
as [MASK]) are zero probability for both.
"""

import torch


def distribution(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature) in float32 (float64 stays float64)."""
    if temperature <= 0:
        raise ValueError(f"a distribution needs a positive temperature, got {temperature}")
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return (logits / temperature).softmax(-1)


def acceptance_probability(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Σ min(p, q): the probability that speculative sampling at `temperature` keeps a draft drawn from q."""
    return torch.minimum(distribution(teacher, temperature), distribution(student, temperature)).sum(-1)


def total_variation(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """TV(p, q) = ½ Σ |p − q| = 1 − Σ min(p, q): the probability that a draft is rejected."""
    return 1 - acceptance_probability(student, teacher, temperature)


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p‖q) = Σ p (log p − log q), terms with p = 0 counted as 0."""
    log_p = (teacher if teacher.dtype == torch.float64 else teacher.float()) / temperature
    log_q = (student if student.dtype == torch.float64 else student.float()) / temperature
    log_p, log_q = log_p.log_softmax(-1), log_q.log_softmax(-1)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def argmax_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """−log q(argmax p) (temperature 1: the target is the token greedy verification wants)."""
    del temperature  # the target is a token, not a distribution; kept so every loss has one signature
    target = teacher.argmax(-1, keepdim=True)
    log_q = (student if student.dtype == torch.float64 else student.float()).log_softmax(-1)
    return -log_q.gather(-1, target)[..., 0]


LOSSES = {"tv": total_variation, "kl": kl_divergence, "ce": argmax_cross_entropy}


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float = 1.0,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of loss `kind` (a key of `LOSSES`) over the positions where `valid` (...) is true (all if None)."""
    per_position = LOSSES[kind](student, teacher, temperature)
    if valid is None:
        return per_position.mean()
    valid = valid.to(per_position.dtype)
    return (per_position * valid).sum() / valid.sum().clamp_min(1)


def greedy_agreement(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 where argmax q = argmax p: greedy verification keeps the draft (given the drafts before it)."""
    return (student.argmax(-1) == teacher.argmax(-1)).to(torch.float32)


def draft_statistics(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                     valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Sums over groups of drafts, for averaging across batches. `student`, `teacher`: (..., k, V), the k drafted
    positions of each group last but one; `valid` (..., k). Returns (float64 sums):

    - `tv` (k): Σ TV per draft position; `acceptance` (k): Σ min(p, q) summed, the expected acceptance of
      speculative sampling at `temperature`; `greedy_acceptance` (k): how often argmax q = argmax p;
    - `tokens_per_round`: Σ over groups of 1 + the expected number of leading drafts accepted, Σ_i Π_{j≤i} α_j
      (α_j = Σ min(p, q) at draft j, given the parent's tokens before it); `greedy_tokens_per_round`: 1 + the
      leading run of greedy agreement, what one greedy draft-and-verify round yields on this text;
    - `positions` (k) and `groups`: how many positions and groups were counted (whole groups only for rounds).
    """
    k = student.shape[-2]
    valid = torch.ones(student.shape[:-1], dtype=torch.bool, device=student.device) if valid is None else valid
    alpha = acceptance_probability(student, teacher, temperature).double()
    agree = greedy_agreement(student, teacher).double()
    weight = valid.double().reshape(-1, k)
    alpha, agree = alpha.reshape(-1, k), agree.reshape(-1, k)
    whole = weight.prod(-1)  # a group cut short by the end of the text says nothing about a whole round
    return {
        "tv": ((1 - alpha) * weight).sum(0), "acceptance": (alpha * weight).sum(0),
        "greedy_acceptance": (agree * weight).sum(0), "positions": weight.sum(0),
        "tokens_per_round": ((1 + alpha.cumprod(-1).sum(-1)) * whole).sum(),
        "greedy_tokens_per_round": ((1 + agree.cumprod(-1).sum(-1)) * whole).sum(), "groups": whole.sum(),
    }


def summarize(sums: dict[str, torch.Tensor]) -> dict:
    """`draft_statistics` sums (added over batches) as the metrics a validation logs."""
    per_position = lambda name: [round(v, 6) for v in (sums[name] / sums["positions"].clamp_min(1)).tolist()]  # noqa: E731
    groups = float(sums["groups"].clamp_min(1))
    return {
        "val_tv": float(sums["tv"].sum() / sums["positions"].sum().clamp_min(1)),
        "val_acceptance": per_position("acceptance"),
        "val_greedy_acceptance": per_position("greedy_acceptance"),
        "val_tokens_per_round": float(sums["tokens_per_round"]) / groups,
        "val_greedy_tokens_per_round": float(sums["greedy_tokens_per_round"]) / groups,
    }
