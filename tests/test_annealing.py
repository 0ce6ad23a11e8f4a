"""Attention-mask annealing: exact at ratio 0, nothing built at ratio 1, right density in between, eager and
sdpa agree, and implementations that would drop the mask are refused."""

from types import SimpleNamespace

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from adapt import AdaptError
from adapt.training.annealing import AnnealConfig, annealed_attention_mask, check_annealing_supported, mask_ratio
from adapt.model import MaskedDiffusionConfig, MaskedDiffusionLM
from tiny_models import ARCHS, tiny_config


def _model(arch, impl):
    torch.manual_seed(0)
    model = MaskedDiffusionLM(MaskedDiffusionConfig(text_config=tiny_config(arch, 100).to_dict(), mask_token_id=5))
    model.set_attn_implementation(impl)
    return model.eval()


def _batch():
    x = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    pad = torch.ones_like(x)
    pad[1, 9:] = 0  # right padding on the second row
    return x, pad


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_ratio_0_is_exactly_the_causal_model(arch, impl):
    if arch == "gemma2" and impl == "sdpa":
        pytest.skip("transformers' Gemma2 has no sdpa path")
    model = _model(arch, impl)
    x, pad = _batch()
    with torch.no_grad():
        annealed = model(x, attention_mask=annealed_attention_mask(model, pad, 0.0),
                         position_ids=(pad.cumsum(-1) - 1).clamp_min(0)).logits
        causal = model(x, attention_mask=pad, is_causal=True).logits
    real = pad.bool()
    torch.testing.assert_close(annealed[real], causal[real], atol=1e-6, rtol=0)


def test_ratio_1_builds_no_dense_mask(monkeypatch):
    model = _model("llama", "sdpa")
    seen = []
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask)
        return original(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
    x = torch.randint(4, 100, (2, 12))
    pad = torch.ones_like(x)
    mask = annealed_attention_mask(model, pad, 1.0)
    assert mask is pad
    with torch.no_grad():
        model(x, attention_mask=mask)
    assert len(seen) == 2 and all(m is None for m in seen)


@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_visible_future_fraction_matches_ratio(ratio):
    model = _model("llama", "sdpa")
    length = 512
    mask = annealed_attention_mask(model, torch.ones(2, length, dtype=torch.long), ratio,
                                   torch.Generator().manual_seed(1))
    upper = torch.ones(length, length, dtype=torch.bool).triu(1)
    assert mask[0, 0][upper].float().mean().item() == pytest.approx(ratio, abs=0.02)
    assert mask[0, 0][~upper].all()  # the causal part is always visible
    assert torch.equal(mask[0], mask[1])  # one sample shared by the batch


def test_eager_and_sdpa_agree_while_annealing():
    x, pad = _batch()
    out = {}
    for impl in ("eager", "sdpa"):
        model = _model("qwen2", impl)
        mask = annealed_attention_mask(model, pad, 0.5, torch.Generator().manual_seed(3))
        with torch.no_grad():
            out[impl] = model(x, attention_mask=mask, position_ids=(pad.cumsum(-1) - 1).clamp_min(0)).logits
    real = pad.bool()
    torch.testing.assert_close(out["eager"][real], out["sdpa"][real], atol=1e-5, rtol=0)


def test_implementation_that_drops_masks_is_refused():
    fake = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(_attn_implementation="flash_attention_2")))
    with pytest.raises(AdaptError, match="cannot honour the annealing mask"):
        check_annealing_supported(fake, AnnealConfig())
    check_annealing_supported(fake, AnnealConfig(mode="none"))  # no annealing, nothing to honour


def test_schedules():
    lin = AnnealConfig(anneal_steps=10)
    assert [mask_ratio(s, lin) for s in (0, 4, 9, 50)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    cos = AnnealConfig(anneal_steps=10, schedule="cosine")
    assert mask_ratio(4, cos) == pytest.approx(0.5) and mask_ratio(0, cos) < 0.1 and mask_ratio(9, cos) == 1.0
    assert mask_ratio(0, AnnealConfig(mode="none")) == 1.0
