"""The distillation losses and draft statistics (`adapt.training.distill`), in closed form on a 3-token vocabulary:
TV = 1 − Σ min(p, q) = ½ Σ |p − q| (1 − speculative sampling's acceptance), KL and the argmax cross-entropy by
hand, the temperature applied to both, a forbidden token (-inf) ignored, and the per-position statistics."""

import math

import pytest
import torch

from adapt.training.distill import (acceptance_probability, argmax_cross_entropy, distill_loss, draft_statistics,
                                    kl_divergence, summarize, total_variation)
from adapt.training.drafter_training import draft_cuts

P = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
Q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)


def test_total_variation_is_one_minus_the_acceptance_of_speculative_sampling():
    tv = total_variation(Q.log(), P.log())
    assert tv.item() == pytest.approx(1 - (0.2 + 0.2 + 0.2))
    assert tv.item() == pytest.approx(0.5 * (0.3 + 0.1 + 0.4))
    # Σ_x q(x) min(1, p(x)/q(x)): the probability that a draft drawn from q is kept
    kept = sum(q * min(1.0, p / q) for p, q in zip(P.tolist(), Q.tolist()))
    assert acceptance_probability(Q.log(), P.log()).item() == pytest.approx(kept)
    assert total_variation(P.log(), P.log()).item() == pytest.approx(0.0, abs=1e-12)


def test_kl_and_argmax_cross_entropy_by_hand():
    assert kl_divergence(Q.log(), P.log()).item() == pytest.approx(
        0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.6))
    assert argmax_cross_entropy(Q.log(), P.log()).item() == pytest.approx(-math.log(0.2))  # p's argmax is token 0


def test_temperature_divides_both_logits():
    t = 2.0
    p, q = (P.log() / t).softmax(-1), (Q.log() / t).softmax(-1)
    assert total_variation(Q.log(), P.log(), t).item() == pytest.approx(1 - torch.minimum(p, q).sum().item())
    assert kl_divergence(Q.log(), P.log(), t).item() == pytest.approx((p * (p / q).log()).sum().item())


def test_a_forbidden_token_has_zero_probability_for_both():
    inf = torch.tensor([-math.inf], dtype=torch.float64)
    p, q = torch.cat([P.log(), inf]), torch.cat([Q.log(), inf])
    assert total_variation(q, p).item() == pytest.approx(total_variation(Q.log(), P.log()).item())
    assert kl_divergence(q, p).item() == pytest.approx(kl_divergence(Q.log(), P.log()).item())


def test_losses_have_gradients_and_skip_invalid_positions():
    student = torch.stack([Q.log(), P.log()]).requires_grad_()
    teacher = torch.stack([P.log(), P.log()])
    for kind in ("tv", "kl", "ce"):
        loss = distill_loss(student, teacher, kind, valid=torch.tensor([True, False]))
        assert loss.item() == pytest.approx(distill_loss(student[:1], teacher[:1], kind).item())
        (grad,) = torch.autograd.grad(loss, student)
        assert grad[0].abs().sum() > 0 and not grad[1].any()


def test_draft_statistics_per_position_and_tokens_per_round():
    # two groups of k = 2: group 0 agrees at both drafts, group 1 at neither (greedy)
    student = torch.stack([torch.stack([P.log(), P.log()]), torch.stack([Q.log(), Q.log()])])
    teacher = torch.stack([torch.stack([P.log(), P.log()]), torch.stack([P.log(), P.log()])])
    sums = draft_statistics(student, teacher, temperature=1.0)
    m = summarize(sums)
    a = 1 - total_variation(Q.log(), P.log()).item()  # 0.6
    assert m["val_acceptance"] == pytest.approx([(1 + a) / 2] * 2, abs=1e-6)
    assert m["val_greedy_acceptance"] == [0.5, 0.5]
    assert m["val_tv"] == pytest.approx((1 - a) / 2)
    assert m["val_greedy_tokens_per_round"] == pytest.approx(((1 + 2) + (1 + 0)) / 2)
    assert m["val_tokens_per_round"] == pytest.approx(((1 + 1 + 1) + (1 + a + a * a)) / 2)
    # a group cut short by the end of the text counts per position, not as a round
    part = draft_statistics(student, teacher, 1.0, valid=torch.tensor([[True, True], [True, False]]))
    assert part["positions"].tolist() == [2, 1] and part["groups"].item() == 1


@pytest.mark.parametrize("groups", [None, 3])
def test_cuts_leave_two_clean_tokens_before_and_fit_the_row(groups):
    # a group drafts tokens cut..cut+k-1 given those before cut - 1 (drafter_training_logits): 2 <= cut <= length - k
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        cuts, valid = draft_cuts(torch.tensor([16, 10]), 16, 4, groups, g)
        assert (cuts >= 2).all() and (cuts[0] + 4 <= 16).all() and (cuts[1] + 4 <= 10).all()
        assert valid[0].all() and valid.shape == cuts.shape + (4,)
    cuts, _ = draft_cuts(torch.tensor([16]), 16, 4, None, g)
    assert cuts.shape == (1, 3) and (cuts.diff() == 4).all()  # covering: every k tokens from one offset
    seen = {tuple(draft_cuts(torch.tensor([16]), 16, 4, None, g)[0][0].tolist()) for _ in range(50)}
    assert seen == {(2, 6, 10), (3, 7, 11), (4, 8, 12)}  # every offset whose last group fits


@pytest.mark.parametrize("groups", [None, 3])
def test_cuts_start_where_each_row_says_and_a_row_without_room_drafts_nothing(groups):
    # self-distilled rows draft only their continuation: from one past its first token (`continuation_starts`)
    g = torch.Generator().manual_seed(0)
    starts, lengths = torch.tensor([7, 3, 14]), torch.tensor([20, 12, 16])
    seen = set()
    for _ in range(50):
        cuts, valid = draft_cuts(lengths, 20, 4, groups, g, starts)
        for row in range(2):
            fits = (cuts[row] >= starts[row]) & (cuts[row] + 4 <= lengths[row])
            assert fits.all() and valid[row, 0, 0]  # an invalid group is clamped inside the row, not counted
        assert valid[:2].all() if groups else valid[1, :, 0].tolist() == [True, True, False]  # covering: 2 fit
        assert not valid[2].any()  # 16 - 4 < 14: no group fits after its start
        seen |= {int(cuts[0].min())} if groups is None else set(cuts[0].tolist())
    assert seen == ({7, 8} if groups is None else set(range(7, 17)))  # covering: the offsets whose 3 groups fit;
    # drawn: every cut of the row's range


def test_self_distilled_rows_are_maskable_on_their_continuation_only():
    from adapt.training.drafter_training import _with_continuation, continuation_starts

    ids = torch.arange(14).reshape(2, 7)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])  # right-aligned: the padding after the continuation
    batch = _with_continuation(ids, mask, 3)
    assert batch.maskable.tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0]]
    assert continuation_starts(batch).tolist() == [5, 3]  # one past the parent's first token
    assert _with_continuation(ids, None, 3).maskable[:, 4:].all()

