"""Speculative sampling's accept/resample step yields the parent's distribution exactly: enumerated in closed form
on a small vocabulary (every draft, every accept/reject outcome, weighted by its probability), not sampled. The
distribution it targets is transformers' `generate(do_sample=True)`'s: temperature, then top-k, then top-p."""

import itertools

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from adapt.model.speculative_masked_diffusion import acceptance, residual, token_distribution, verdict

V = 4


def _dist(seed, temperature=0.8, top_k=None, top_p=None, shape=()):
    g = torch.Generator().manual_seed(seed)
    return token_distribution(torch.randn(*shape, V, generator=g, dtype=torch.float64) * 2, temperature, top_k,
                              top_p)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 3, None), (1.3, None, 0.8),
                                                     (0.9, 5, 0.6)])
def test_the_target_is_transformers_sampling_distribution(temperature, top_k, top_p):
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p else []))
    expected = warpers(None, logits.clone()).softmax(-1).double()
    got = token_distribution(logits, temperature, top_k, top_p)
    assert torch.equal(got > 0, expected > 0)  # the same tokens kept
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_acceptance_and_residual_give_p_for_one_draft():
    """P(out = y) = sum_x q(x) [a(x) [y = x] + (1 - a(x)) r(y)] = p(y), with q zero where p is not and the
    reverse (filters differ between parent and drafter)."""
    for seed in range(20):
        p = _dist(seed, top_k=3)
        q = _dist(100 + seed, top_p=0.7)
        out = torch.zeros(V, dtype=torch.float64)
        for x in range(V):
            a = acceptance(p, q, torch.tensor(x))
            out += q[x] * (a * torch.nn.functional.one_hot(torch.tensor(x), V) + (1 - a) * residual(p, q))
        torch.testing.assert_close(out, p, atol=1e-12, rtol=0)


def _outcomes(k):
    """Every accept/reject pattern of k drafts as the uniforms that produce it: u = 0 accepts (if a > 0), u = 1
    rejects (a <= 1); its weight is read from the acceptance probabilities by the caller."""
    return [torch.tensor([list(u)], dtype=torch.float64) for u in itertools.product([0.0, 1.0], repeat=k)]


@pytest.mark.parametrize("greedy_drafter", [False, True], ids=["sampled", "point-mass drafter"])
def test_one_round_of_two_drafts_yields_the_parents_joint_distribution(greedy_drafter):
    """A round drafts x1 ~ q1, x2 ~ q2(.|x1); `verdict` accepts some and gives the next token's distribution;
    when x1 is rejected the second token comes from the next round, whose first token is distributed as the parent
    (the single-draft case above). The joint law of the first two output tokens must be p1(y1) p2(y2|y1)."""
    p1, p2, p3 = _dist(1, top_k=3), _dist(2, top_p=0.9, shape=(V,)), _dist(3, shape=(V, V))
    q1, q2 = _dist(4, temperature=1.5), _dist(5, temperature=0.5, top_k=2, shape=(V,))
    if greedy_drafter:  # a drafter that always proposes one token: q is a point mass
        q1 = torch.nn.functional.one_hot(q1.argmax(), V).double()
    joint = torch.zeros(V, V, dtype=torch.float64)
    for x1, x2 in itertools.product(range(V), repeat=2):
        weight = q1[x1] * q2[x1, x2]
        if weight == 0:
            continue
        drafts = torch.tensor([[x1, x2]])
        p = torch.stack([p1, p2[x1], p3[x1, x2]])[None]  # the parent's at each draft's position, given the drafts
        q = torch.stack([q1, q2[x1]])[None]
        alphas = acceptance(p[:, :2], q, drafts)[0]
        for u in _outcomes(2):
            chance = torch.where(u[0] == 0, alphas, 1 - alphas).prod()
            if chance == 0:
                continue
            accepted, following = verdict(p, q, drafts, u)
            a, w = int(accepted), weight * chance
            if a >= 2:
                joint[x1, x2] += w
            elif a == 1:
                joint[x1] += w * following[0]
            else:  # y1 from the residual, y2 from the next round: the parent's p2(. | y1)
                joint += w * following[0][:, None] * p2
    torch.testing.assert_close(joint, p1[:, None] * p2, atol=1e-12, rtol=0)
    assert joint.sum() == pytest.approx(1.0, abs=1e-12)


def test_after_the_last_draft_the_next_token_is_the_parents():
    p = _dist(7, shape=(1, 2))
    q = _dist(8, shape=(1, 1))
    drafts = torch.tensor([[int(q[0, 0].argmax())]])
    accepted, following = verdict(p, q, drafts, torch.zeros(1, 1, dtype=torch.float64))
    assert int(accepted) == 1
    torch.testing.assert_close(following[0], p[0, 1], atol=1e-15, rtol=0)
