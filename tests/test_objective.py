"""The loss on fixed tensors against hand-computed values; masking rules; t sampling."""

import math

import pytest
import torch

from adapt.training.objective import ObjectiveConfig, cart_weights, diffusion_loss, noised_batch, sample_t

V = 5


def _fixed():
    # 2 sequences of 4 tokens; logits chosen so each CE is known in closed form
    logits = torch.zeros(2, 4, V)
    logits[0, :, 1] = math.log(4.0)  # p(token 1) = 4/8 = 0.5 at every position of row 0
    x0 = torch.tensor([[1, 1, 2, 1], [3, 4, 0, 2]])
    masked = torch.tensor([[False, True, True, False], [True, False, False, True]])
    maskable = torch.tensor([[True, True, True, True], [True, True, True, False]])
    t = torch.tensor([0.5, 0.25])
    return logits, x0, masked, maskable, t


def _ce(row, pos, tok, logits):
    return -torch.log_softmax(logits[row, pos], -1)[tok].item()


@pytest.mark.parametrize("norm", ["masked", "all", "sequence"])
def test_unshifted_loss_matches_hand_computation(norm):
    logits, x0, masked, maskable, t = _fixed()
    # row 0: positions 1 (token 1, p=.5) and 2 (token 2, p=1/8), weight 1/0.5; row 1: positions 0 and 3, uniform
    # logits (p=1/5), weight 1/0.25
    r0 = (math.log(2) + math.log(8)) * 2.0
    r1 = (math.log(5) + math.log(5)) * 4.0
    expected = {"masked": (r0 + r1) / 4, "all": (r0 + r1) / 7, "sequence": (r0 / 4 + r1 / 3) / 2}[norm]
    got = diffusion_loss(logits, x0, masked, maskable, t, ObjectiveConfig(normalization=norm), shift=False)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_weight_is_one_over_t_not_t():
    logits, x0, masked, maskable, t = _fixed()
    cfg = ObjectiveConfig(normalization="all")
    base = diffusion_loss(logits, x0, masked, maskable, t, cfg, shift=False)
    halved = diffusion_loss(logits, x0, masked, maskable, t / 2, cfg, shift=False)
    assert halved.item() == pytest.approx(2 * base.item(), rel=1e-6)  # weighting by t would halve it instead


def test_shift_uses_logit_before_each_masked_position():
    logits, x0, masked, maskable, t = _fixed()
    cfg = ObjectiveConfig(normalization="masked")
    # with shift, masked position 1 of row 0 is predicted by logits[0, 0] (p(token 1) = .5) and position 2 by
    # logits[0, 1] (p(token 2) = 1/8); row 1 position 3 by logits[1, 2] (uniform); row 1 position 0 has no
    # predictor and is dropped
    expected = ((math.log(2) + math.log(8)) * 2.0 + math.log(5) * 4.0) / 3
    assert diffusion_loss(logits, x0, masked, maskable, t, cfg, shift=True).item() == pytest.approx(expected)
    # moving the evidence one position later must change the shifted loss but not the unshifted one's indexing
    moved = torch.zeros_like(logits)
    moved[0, 1:, 1] = math.log(4.0)
    a = diffusion_loss(moved, x0, masked, maskable, t, cfg, shift=True)
    b = diffusion_loss(logits, x0, masked, maskable, t, cfg, shift=True)
    assert a.item() != pytest.approx(b.item())


@pytest.mark.parametrize("shift", [True, False])
def test_prompt_padding_and_unpredictable_position_never_masked(shift):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 50, (64, 16), generator=g)
    maskable = torch.ones_like(x0, dtype=torch.bool)
    maskable[:, :5] = False  # prompt
    maskable[::2, -3:] = False  # padding
    cfg = ObjectiveConfig(complementary=True)
    ever = torch.zeros_like(x0, dtype=torch.bool)
    for _ in range(50):
        x_t, _, masked, _, _ = noised_batch(x0, maskable, cfg, mask_id=99, shift=shift, generator=g)
        assert ((x_t == 99) == masked).all()
        ever |= masked[:64] | masked[64:]
    assert not (ever & ~maskable).any()
    assert ever[:, 5:-3].all()  # every maskable position gets masked at some point


def test_complementary_pairs_cover_every_maskable_token_once():
    x0 = torch.arange(40).view(2, 20)
    maskable = torch.ones_like(x0, dtype=torch.bool)
    _, _, masked, _, t = noised_batch(x0, maskable, ObjectiveConfig(complementary=True), 99, shift=False,
                                      generator=torch.Generator().manual_seed(1))
    assert torch.equal(masked[:2] ^ masked[2:], maskable) and not (masked[:2] & masked[2:]).any()
    torch.testing.assert_close(t[2:], (1 - t[:2]).clamp_min(1e-3))


def test_antithetic_t_covers_the_interval():
    cfg = ObjectiveConfig(t_sampling="antithetic")
    t = sample_t(1000, cfg, torch.Generator().manual_seed(0))
    assert t.min() >= cfg.eps and t.max() <= 1.0
    hist = torch.histc(t, bins=10, min=cfg.eps, max=1.0)
    assert (hist == 100).all()  # exactly stratified: one draw per 1/B slice
    iid = sample_t(1000, ObjectiveConfig(), torch.Generator().manual_seed(0))
    assert iid.min() >= 1e-3 and not (torch.histc(iid, bins=10, min=1e-3, max=1.0) == 100).all()


def test_cart_weight_closed_form():
    masked = torch.tensor([[False, True, False, True]])
    maskable = torch.ones_like(masked)
    p = 0.3
    w = cart_weights(masked, maskable, p)
    geo = lambda k: p * (1 - p) ** k  # noqa: E731
    # position 1: clean neighbours at 0 (distance 1) and 2 (distance 1); position 3: clean at 2 (1) and 0 (3)
    assert w[0, 1].item() == pytest.approx(0.5 * (geo(0) + geo(0)))
    assert w[0, 3].item() == pytest.approx(0.5 * (geo(0) + geo(2)))


def test_the_mask_token_is_excluded_from_the_predicted_distribution():
    """CE with mask_token_id equals CE over the logits with the [MASK] column removed, and its gradient too."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    x0 = torch.randint(0, 6, (2, 5))  # never the mask token 6
    masked = torch.rand(2, 5) < 0.6
    maskable, t = torch.ones_like(masked), torch.tensor([0.6, 0.3])
    cfg = ObjectiveConfig()
    got = diffusion_loss(logits, x0, masked, maskable, t, cfg, shift=False, mask_token_id=6)
    reference = diffusion_loss(logits[..., :6], x0, masked, maskable, t, cfg, shift=False)
    assert got.item() == pytest.approx(reference.item(), rel=1e-6)
    g1, = torch.autograd.grad(got, logits)
    g2, = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("cfg", [ObjectiveConfig(normalization="masked"), ObjectiveConfig(normalization="sequence"),
                                 ObjectiveConfig(normalization="all", weighting="cart")], ids=["masked", "sequence", "cart"])
def test_loss_from_the_first_loss_column_equals_the_full_loss(shift, cfg):
    """SFT computes logits only from `first_loss_column` on (prompts are never noised): the same loss, term for term."""
    from adapt.training.objective import first_loss_column

    torch.manual_seed(0)
    x0 = torch.randint(0, V, (3, 10))
    maskable = torch.zeros(3, 10, dtype=torch.bool)
    for row, start in enumerate([6, 4, 7]):  # prompts of different lengths, answers to the end
        maskable[row, start:] = True
    x_t, x0_, masked, maskable_, t = noised_batch(x0, maskable, cfg, mask_id=V - 1, shift=shift,
                                                  generator=torch.Generator().manual_seed(1))
    logits = torch.randn(3, 10, V)
    first = first_loss_column(maskable, shift)
    assert first == 4 - shift and maskable[:, :first + shift].sum() == 0
    full = diffusion_loss(logits, x0_, masked, maskable_, t, cfg, shift)
    trimmed = diffusion_loss(logits[:, first:], x0_[:, first:], masked[:, first:], maskable_[:, first:], t, cfg, shift)
    torch.testing.assert_close(trimmed, full, atol=1e-6, rtol=0)
    assert first_loss_column(torch.zeros(2, 5, dtype=torch.bool), shift) == 0
