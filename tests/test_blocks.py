"""Block-diffusion training pieces (adapt/blocks.py, per-block noise in adapt/objective.py)."""

import pytest
import torch

from adapt.config.diffusion import BlockConfig
from adapt.training.blocks import block_t, documents
from adapt.model.block_masked_diffusion import canvas_index, two_l_logits
from adapt.errors import AdaptError
from adapt.training.objective import ObjectiveConfig, diffusion_loss, noised_batch


def test_block_t_is_one_t_per_block_stratified_across_blocks():
    t = block_t(64, 22, 4, eps=1e-3, generator=torch.Generator().manual_seed(0))
    assert t.shape == (64, 22) and t.min() >= 1e-3 and t.max() <= 1
    blocks = t[:, ::4]  # 6 blocks, the last partial
    assert torch.equal(t, blocks.repeat_interleave(4, 1)[:, :22])
    gaps = blocks.sort(1).values.diff(1)  # a shifted lattice: the blocks of a row are 1/6 apart in u
    assert torch.allclose(gaps, torch.full_like(gaps, (1 - 1e-3) / 6), atol=1e-5)
    assert abs(blocks.mean().item() - 0.5) < 0.02


def test_canvas_index_takes_the_clean_half_at_block_ends_under_shift():
    positions = torch.arange(6)[None]
    assert canvas_index(positions, 3, shift=True).tolist() == [[0, 1, 2 + 6, 3, 4, 5 + 6]]
    assert canvas_index(positions, 3, shift=False).tolist() == [[0, 1, 2, 3, 4, 5]]
    left_padded = torch.tensor([[0, 0, 0, 1, 2, 3]])  # block ends follow each row's own positions
    assert canvas_index(left_padded, 2, shift=True).tolist() == [[0, 1, 2, 3 + 6, 4, 5 + 6]]


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


# ---------------------------------------------------------------------------------- the 2L forward in training

from adapt.model import MaskedDiffusionConfig, MaskedDiffusionLM  # noqa: E402
from tiny_models import tiny_config  # noqa: E402


def _model(arch, impl):
    torch.manual_seed(0)
    model = MaskedDiffusionLM(MaskedDiffusionConfig(text_config=tiny_config(arch, 100).to_dict(), mask_token_id=5))
    model.set_attn_implementation(impl)
    return model.eval()


def _rows(length=12, seed=0):
    return torch.randint(6, 100, (2, length), generator=torch.Generator().manual_seed(seed))


def _two_l(model, x_t, x0, padding, block_size, document_ids=None):
    with torch.no_grad():
        return two_l_logits(model, x_t, x0, padding, block_size=block_size, document_ids=document_ids)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_2l_right_padding_and_packed_documents(arch):
    model, B = _model(arch, "eager"), 4
    x0 = _rows()
    padding = torch.ones_like(x0)
    padding[1, 9:] = 0  # training rows are right-padded
    a = _two_l(model, x0, x0, padding, B)
    other = x0.clone()
    other[1, 9:] = 50  # what sits under padding never matters
    b = _two_l(model, other, other, padding, B)
    torch.testing.assert_close(a[1, :9], b[1, :9], atol=1e-6, rtol=0)
    # a document boundary after position 5: the second document's tokens never see the first's
    docs = documents(x0.masked_fill(torch.arange(12) == 5, 2), ("eos", 2))
    assert docs[0].tolist() == [0] * 6 + [1] * 6
    # the same boundary marked by a BOS at position 6, which starts its own document
    assert documents(x0.masked_fill(torch.arange(12) == 6, 1), ("bos", 1))[0].tolist() == docs[0].tolist()
    first = _two_l(model, x0, x0, torch.ones_like(x0), B, docs)
    changed = x0.clone()
    changed[:, 1] = 60
    second = _two_l(model, changed, changed, torch.ones_like(x0), B, docs)
    torch.testing.assert_close(first[:, 6:], second[:, 6:], atol=1e-6, rtol=0)
    assert (first[:, 1:5] - second[:, 1:5]).abs().max() > 1e-4  # inside the first document it does matter


def test_an_implementation_that_drops_the_block_mask_is_one_clear_error():
    from adapt.training.blocks import check_block_attention

    model = _model("llama", "sdpa")
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(AdaptError, match="cannot take the block-diffusion mask"):
        check_block_attention(model)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3_moe"])
def test_block_size_1_elbo_is_the_parents_exact_nll(arch):
    import torch.nn.functional as F

    from adapt.training.likelihood import diffusion_elbo

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
    from adapt.training.likelihood import diffusion_elbo

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
    opts = dict(seq_length=16, num_sequences=6, sample_by="line")
    parent = adapt.evaluate(str(source), str(data), **opts)["elbo"]["nll_nats_per_token"]
    result = adapt.evaluate(str(dlm), str(data), mc_samples=2, block_size=1, **opts)
    assert result["elbo"]["elbo_nats_per_token"] == pytest.approx(parent, abs=1e-4)
    assert result["elbo"]["block_size"] == 1 and "trained full-sequence" in result["block_size_note"]
    with pytest.raises(AdaptError, match="a causal LM has no blocks"):
        adapt.evaluate(str(source), str(data), block_size=1, **opts)
