"""Block-diffusion training pieces (adapt/blocks.py, per-block noise in adapt/objective.py)."""

import pytest
import torch

from adapt.blocks import BlockConfig, block_t, canvas_logits, documents, two_l_inputs, two_l_visible
from adapt.errors import AdaptError
from adapt.objective import ObjectiveConfig, diffusion_loss, noised_batch


def _visible(length, block):
    idx = torch.arange(2 * length)
    return two_l_visible(length, block)(0, 0, idx[:, None], idx[None, :])


def test_block_t_is_one_t_per_block_stratified_across_blocks():
    t = block_t(64, 22, 4, eps=1e-3, generator=torch.Generator().manual_seed(0))
    assert t.shape == (64, 22) and t.min() >= 1e-3 and t.max() <= 1
    blocks = t[:, ::4]  # 6 blocks, the last partial
    assert torch.equal(t, blocks.repeat_interleave(4, 1)[:, :22])
    gaps = blocks.sort(1).values.diff(1)  # a shifted lattice: the blocks of a row are 1/6 apart in u
    assert torch.allclose(gaps, torch.full_like(gaps, (1 - 1e-3) / 6), atol=1e-5)
    assert abs(blocks.mean().item() - 0.5) < 0.02


def test_two_l_mask_clean_never_sees_noised_and_blocks_see_only_earlier_clean_blocks():
    L, B = 8, 4
    v = _visible(L, B)
    noised, clean = slice(0, L), slice(L, 2 * L)
    assert not v[clean, noised].any()  # clean tokens never see noised ones
    # a noised block sees itself both ways, no other noised block
    assert v[0:4, 0:4].all() and v[4:8, 4:8].all() and not v[0:4, 4:8].any() and not v[4:8, 0:4].any()
    assert not v[0:4, clean].any()  # block 0 has no earlier clean block
    assert v[4:8, L:L + 4].all() and not v[4:8, L + 4:].any()  # block 1 sees clean block 0 only
    assert v[L + 4:, L:].all() and not v[L:L + 4, L + 4:].any()  # clean: block-causal


def test_two_l_mask_at_block_size_1_is_causal_on_the_clean_half():
    L = 6
    v = _visible(L, 1)
    assert torch.equal(v[L:, L:], torch.ones(L, L, dtype=torch.bool).tril())
    assert torch.equal(v[:L, L:], torch.ones(L, L, dtype=torch.bool).tril(-1))  # noised j sees clean < j


def test_two_l_inputs_repeat_positions():
    x_t, x0 = torch.tensor([[9, 9, 3]]), torch.tensor([[1, 2, 3]])
    ids, pos, pad = two_l_inputs(x_t, x0, torch.ones_like(x0))
    assert ids.tolist() == [[9, 9, 3, 1, 2, 3]] and pos.tolist() == [[0, 1, 2, 0, 1, 2]] and pad.shape == (1, 6)


def test_canvas_logits_take_the_clean_half_at_block_ends_under_shift():
    L, B = 6, 3
    logits = torch.arange(2 * L, dtype=torch.float)[None, :, None]  # the logit is its 2L position
    assert canvas_logits(logits, L, B, shift=True)[0, :, 0].tolist() == [0, 1, 2 + L, 3, 4, 5 + L]
    assert canvas_logits(logits, L, B, shift=False)[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5]


def test_complementary_masks_partition_every_block_and_t_is_per_block():
    x0 = torch.arange(2, 18).view(2, 8)
    maskable = torch.ones_like(x0, dtype=torch.bool)
    cfg = ObjectiveConfig(complementary=True)
    x_t, x0_, masked, maskable_, t = noised_batch(x0, maskable, cfg, mask_id=1, shift=True,
                                                  generator=torch.Generator().manual_seed(0), block_size=4)
    assert t.shape == (4, 8) and torch.allclose(t[2:], (1 - t[:2]).clamp_min(cfg.eps))
    assert torch.equal(masked[:2] ^ masked[2:], maskable_[:2]) and not (masked[:2] & masked[2:]).any()
    assert not masked[:, 0].any()  # nothing predicts position 0 under shift
    assert torch.equal(x_t == 1, masked)


def test_block_loss_matches_a_hand_computed_value():
    """Two blocks of 2 with t = 0.5 and 0.25; masked tokens 1 and 3; uniform logits over V = 4: CE = ln 4 each,
    weights 1/t = 2 and 4; shift drops position 0. Normalised by the 2 masked tokens: (2 + 4)·ln 4 / 2."""
    logits = torch.zeros(1, 4, 4)
    x0 = torch.tensor([[0, 1, 2, 3]])
    masked = torch.tensor([[False, True, False, True]])
    t = torch.tensor([[0.5, 0.5, 0.25, 0.25]])
    loss = diffusion_loss(logits, x0, masked, torch.ones_like(masked), t, ObjectiveConfig(), shift=True)
    assert loss.item() == pytest.approx(3 * torch.log(torch.tensor(4.0)).item(), rel=1e-6)


def test_schedule_stages_and_decay():
    cfg = BlockConfig(size=16, schedule=[1, 4, 16], stage_steps=10, decay_to=8, decay_steps=5)
    assert [cfg.size_at(s, 100, None) for s in (0, 9, 10, 19, 20, 94, 95, 99)] == [1, 1, 4, 4, 16, 16, 8, 8]
    assert cfg.final_size(None) == 8 and BlockConfig().size_at(3, 10, 4) == 4 and BlockConfig().final_size(None) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 0}, "block.size|'size' must be in"),
    ({"size": 16, "schedule": [1, 4]}, "must end at block.size"),
    ({"schedule": [1, 4]}, "needs block.size"),
    ({"size": 4, "schedule": [1, 4]}, "stage_steps"),
    ({"size": 4, "decay_to": 2}, "decay_steps"),
])
def test_bad_block_settings_are_one_clear_error(kwargs, message):
    with pytest.raises(AdaptError, match=message):
        BlockConfig(**kwargs)


# ---------------------------------------------------------------------------------- the 2L forward, per architecture

from adapt.blocks import two_l_attention_mask  # noqa: E402
from adapt.model import MaskedDiffusionConfig, MaskedDiffusionLM  # noqa: E402
from tiny_models import ARCHS, tiny_config  # noqa: E402

IMPLS = ["eager", "sdpa"]


def _model(arch, impl):
    if arch == "gemma2" and impl == "sdpa":
        pytest.skip("transformers' Gemma2 has no sdpa path")
    torch.manual_seed(0)
    model = MaskedDiffusionLM(MaskedDiffusionConfig(text_config=tiny_config(arch, 100).to_dict(), mask_token_id=5))
    model.set_attn_implementation(impl)
    return model.eval()


def _two_l(model, x_t, x0, padding, block_size, document_ids=None):
    ids, positions, pad = two_l_inputs(x_t, x0, padding)
    mask = two_l_attention_mask(model, pad, block_size, document_ids)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=positions).logits
    return canvas_logits(logits, x0.shape[1], block_size, shift=True)


def _rows(length=12, seed=0):
    return torch.randint(6, 100, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_block_size_1_training_layout_is_exactly_the_causal_parent(arch, impl):
    model = _model(arch, impl)
    x0 = _rows()
    x_t = x0.masked_fill(torch.rand(x0.shape, generator=torch.Generator().manual_seed(1)) < 0.5, 5)
    with torch.no_grad():
        parent = model(x0, attention_mask=torch.ones_like(x0), is_causal=True).logits
    torch.testing.assert_close(_two_l(model, x_t, x0, torch.ones_like(x0), 1), parent, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_block_mask_later_blocks_never_reach_earlier_ones_and_blocks_are_bidirectional(arch, impl):
    model, B = _model(arch, impl), 4
    x0 = _rows()
    x_t = x0.clone()
    x_t[:, 4:8] = 5  # block 1 fully masked
    base = _two_l(model, x_t, x0, torch.ones_like(x0), B)
    later = x0.clone()
    later[:, 9] = (later[:, 9] + 1 - 6) % 94 + 6  # a token of block 2 changes, clean and noised alike
    later_t = x_t.clone()
    later_t[:, 9] = later[:, 9]
    changed = _two_l(model, later_t, later, torch.ones_like(x0), B)
    torch.testing.assert_close(changed[:, :8], base[:, :8], atol=1e-6, rtol=0)
    assert (changed[:, 8:] - base[:, 8:]).abs().max() > 1e-4
    inside = x_t.clone()
    inside[:, 6] = 7  # a later noised token of block 1 changes the block's earlier positions
    moved = _two_l(model, inside, x0, torch.ones_like(x0), B)
    assert (moved[:, 4] - base[:, 4]).abs().max() > 1e-4
    torch.testing.assert_close(moved[:, :3], base[:, :3], atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_2l_padding_and_documents(arch):
    model, B = _model(arch, "eager"), 4
    x0 = _rows()
    padding = torch.ones_like(x0)
    padding[1, 9:] = 0
    a = _two_l(model, x0, x0, padding, B)
    other = x0.clone()
    other[1, 9:] = 50  # what sits under padding never matters
    b = _two_l(model, other, other, padding, B)
    torch.testing.assert_close(a[1, :9], b[1, :9], atol=1e-6, rtol=0)
    # a document boundary after position 5: the second document's tokens never see the first's
    docs = documents(x0.masked_fill(torch.arange(12) == 5, 2), eos_token_id=2)
    assert docs[0].tolist() == [0] * 6 + [1] * 6
    first = _two_l(model, x0, x0, torch.ones_like(x0), B, docs)
    changed = x0.clone()
    changed[:, 1] = 60
    second = _two_l(model, changed, changed, torch.ones_like(x0), B, docs)
    torch.testing.assert_close(first[:, 6:], second[:, 6:], atol=1e-6, rtol=0)


def test_eager_and_sdpa_agree_on_the_2l_mask():
    x0 = _rows()
    x_t = x0.masked_fill(torch.rand(x0.shape, generator=torch.Generator().manual_seed(2)) < 0.5, 5)
    eager, sdpa = (_two_l(_model("qwen2", impl), x_t, x0, torch.ones_like(x0), 4) for impl in IMPLS)
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=0)


def test_an_implementation_that_drops_the_mask_is_refused():
    model = _model("llama", "sdpa")
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(AdaptError, match="cannot take the block-diffusion mask"):
        two_l_attention_mask(model, torch.ones(1, 8, dtype=torch.long), 2)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3_moe"])
def test_block_size_1_elbo_is_the_parents_exact_nll(arch):
    import torch.nn.functional as F

    from adapt.likelihood import diffusion_elbo

    model = _model(arch, "eager")
    x0 = _rows(length=10)
    with torch.no_grad():
        parent = model(x0, attention_mask=torch.ones_like(x0), is_causal=True).logits
    parent[..., 5] = -torch.inf  # the mask token (id 5 here) is never a clean token
    nll = F.cross_entropy(parent[:, :-1].flatten(0, 1), x0[:, 1:].flatten()).item()
    for k in (1, 3):
        elbo = diffusion_elbo(model, x0, mc_samples=k, batch_size=2, block_size=1)
        assert elbo["elbo_nats_per_token"] == pytest.approx(nll, abs=1e-5)


def test_block_elbo_masks_within_blocks_and_is_batch_size_invariant():
    from adapt.likelihood import diffusion_elbo

    model = _model("llama", "eager")
    x0 = _rows(length=12)
    a = diffusion_elbo(model, x0, mc_samples=4, batch_size=1, block_size=4, seed=3)
    b = diffusion_elbo(model, x0, mc_samples=4, batch_size=8, block_size=4, seed=3)
    assert a == b and a["elbo_nats_per_token"] > 0
    full = diffusion_elbo(model, x0, mc_samples=4, batch_size=8, seed=3)
    assert full["elbo_nats_per_token"] != a["elbo_nats_per_token"]


def test_eval_at_block_size_1_is_the_parents_exact_nll_and_says_so(converted, tmp_path):
    import adapt

    source, dlm = converted("llama")
    data = tmp_path / "d.txt"
    data.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 90}" for j in range(12)) for i in range(40)))
    opts = dict(seq_length=16, num_blocks=6, sample_by="line")
    parent = adapt.evaluate(str(source), str(data), **opts)["elbo"]["nll_nats_per_token"]
    result = adapt.evaluate(str(dlm), str(data), mc_samples=2, block_size=1, **opts)
    assert result["elbo"]["elbo_nats_per_token"] == pytest.approx(parent, abs=1e-4)
    assert result["elbo"]["block_size"] == 1 and "trained full-sequence" in result["block_size_note"]
    with pytest.raises(AdaptError, match="a causal LM has no blocks"):
        adapt.evaluate(str(source), str(data), block_size=1, **opts)
