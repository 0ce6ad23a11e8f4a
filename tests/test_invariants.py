"""Invariants 1-3 for every architecture in the case table, eager and sdpa."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

import adapt
from adapt.model import MaskedDiffusionConfig, MaskedDiffusionLM
from tiny_models import ARCHS, layer_type_variants, tiny_config

IMPLS = ["eager", "sdpa"]
SEQ = 12


def _skip_unsupported(arch, impl):
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(tiny_config(arch))]
    if impl == "sdpa" and not cls._supports_sdpa:
        pytest.skip(f"transformers' {cls.__name__} has no sdpa path (eager only)")


def _ids(vocab=100, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, SEQ), generator=g)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_ratio0_reproduces_source_logits(converted, arch, impl):
    _skip_unsupported(arch, impl)
    src, out = converted(arch)
    causal = AutoModelForCausalLM.from_pretrained(src, attn_implementation=impl).eval()
    model, _ = adapt.load(out, attn_implementation=impl)
    assert model.config.text_config._attn_implementation == impl
    x = _ids(batch=2)
    with torch.no_grad():
        ref = causal(x).logits
        got = model(x, is_causal=True).logits
        bidir = model(x).logits
    torch.testing.assert_close(got[..., : ref.shape[-1]], ref, atol=1e-5, rtol=0)
    assert not torch.allclose(bidir[:, :-1], got[:, :-1], atol=1e-4), "default mode must not be causal"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_later_token_changes_position_0_in_every_layer_type(arch, impl):
    _skip_unsupported(arch, impl)
    for layer_type, base in layer_type_variants(tiny_config(arch, 100)).items():
        torch.manual_seed(0)
        model = MaskedDiffusionLM(MaskedDiffusionConfig(text_config=base.to_dict(), mask_token_id=5))
        model.set_attn_implementation(impl)
        model.eval()
        x = _ids()
        y = x.clone()
        y[0, 6] = 4 if x[0, 6] != 4 else 5
        with torch.no_grad():
            changed = (model(x).logits[0, 0] - model(y).logits[0, 0]).abs().max()
            causal = (model(x, is_causal=True).logits[0, 0] - model(y, is_causal=True).logits[0, 0]).abs().max()
        assert changed > 1e-4, f"{arch}/{layer_type}/{impl}: position 0 does not see position 6"
        assert causal < 1e-6, f"{arch}/{layer_type}/{impl}: causal mode leaks the future"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["bidirectional", "causal"])
def test_padding_never_changes_real_positions(converted, arch, impl, is_causal):
    _skip_unsupported(arch, impl)
    _, out = converted(arch)
    model, tok = adapt.load(out, attn_implementation=impl)
    a, b = _ids(seed=1)[0], _ids(seed=2)[0, :7]
    pad = tok.pad_token_id
    with torch.no_grad():
        alone_a = model(a[None], is_causal=is_causal).logits[0]
        alone_b = model(b[None], is_causal=is_causal).logits[0]
        for side in ("left", "right"):
            fill = torch.full((SEQ - len(b),), pad)
            row_b = torch.cat([fill, b]) if side == "left" else torch.cat([b, fill])
            mask_b = (torch.arange(SEQ) >= SEQ - len(b)) if side == "left" else (torch.arange(SEQ) < len(b))
            batch = torch.stack([a, row_b])
            mask = torch.stack([torch.ones(SEQ, dtype=torch.long), mask_b.long()])
            logits = model(batch, attention_mask=mask).logits if not is_causal else \
                model(batch, attention_mask=mask, is_causal=True).logits
            torch.testing.assert_close(logits[0], alone_a, atol=1e-5, rtol=0)
            torch.testing.assert_close(logits[1][mask_b], alone_b, atol=1e-5, rtol=0, msg=f"{side} padding")
