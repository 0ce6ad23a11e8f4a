"""The transformers internals the remote code touches, one test per compatibility function. CI runs this file on
the oldest supported transformers and on the latest; the CLI's import weight and its silence on CPU."""

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.masking_utils import create_causal_mask

import adapt
from adapt.model import transformers_compat as compat
from tiny_models import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama")).eval()


def test_versions_agree():
    assert adapt.__version__ == compat.DLM_ADAPT_VERSION
    minimum = re.search(r'"transformers>=([\d.]+),', (ROOT / "pyproject.toml").read_text()).group(1)
    assert compat._release(compat.TESTED_TRANSFORMERS[0]) == compat._release(minimum)
    assert compat._release(compat.TESTED_TRANSFORMERS[0]) <= compat._release(transformers.__version__)


def test_cache_goes_in_and_comes_out_under_this_releases_name(llama):
    name = compat.cache_kwarg(llama.forward)
    assert name in compat.CACHE_NAMES
    ids = torch.arange(4, 10)[None]
    with torch.no_grad():
        first = llama(ids[:, :4], use_cache=True)
        cache = compat.output_cache(first)
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 4
        assert compat.output_cache(llama(ids, use_cache=False)) is None
        step = llama(ids[:, 4:], **{name: cache}, use_cache=True)  # the cache was really used: equals a full pass
        full = llama(ids).logits[:, 4:]
    torch.testing.assert_close(step.logits, full, atol=1e-5, rtol=0)


def test_cache_positions_are_selected_and_dropped(llama):
    with torch.no_grad():
        cache = compat.output_cache(llama(torch.arange(4, 10)[None], use_cache=True))
    keys = [layer.keys.clone() for layer in cache.layers]
    compat.select_cache_positions(cache, torch.tensor([5, 0, 2]))
    for layer, k in zip(cache.layers, keys):
        assert torch.equal(layer.keys, k[:, :, [5, 0, 2]])
    compat.drop_last_cached(cache, 2)
    assert cache.get_seq_length() == 1
    for layer, k in zip(cache.layers, keys):
        assert torch.equal(layer.keys, k[:, :, [5]])


def test_set_causal_switches_every_attention_module(llama):
    ids = torch.arange(4, 10)[None]
    with torch.no_grad():
        causal = llama(ids).logits
        compat.set_causal(llama, False)
        flags = {m.is_causal for m in llama.modules() if isinstance(getattr(m, "is_causal", None), bool)}
        bidirectional = llama(ids).logits
        compat.set_causal(llama, True)
        again = llama(ids).logits
    assert flags == {False}
    assert not torch.allclose(causal[:, 0], bidirectional[:, 0])  # position 0 now sees later tokens
    torch.testing.assert_close(again, causal, atol=0, rtol=0)


def test_decoder_class_and_mask_builder(llama):
    assert compat.decoder_class(llama.config) is type(llama)
    flags = compat.attention_support_flags()
    assert "_supports_sdpa" in flags and all(isinstance(getattr(llama, f), bool) for f in flags)
    from adapt.model import MaskedDiffusionConfig, MaskedDiffusionLM

    model = MaskedDiffusionLM(MaskedDiffusionConfig(text_config=llama.config.to_dict(), mask_token_id=5))
    assert {f: getattr(model, f) for f in flags} == {f: getattr(llama, f) for f in flags}
    embeds = torch.empty(1, 5, 0)
    first_future = lambda batch, head, q, kv: (q == 0) & (kv == 1)  # noqa: E731
    mask = compat.causal_mask(create_causal_mask, config=llama.config, inputs_embeds=embeds,
                              attention_mask=torch.ones(1, 5, dtype=torch.long), or_mask_function=first_future,
                              allow_is_causal_skip=False)
    visible = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0
    assert torch.equal(visible, torch.ones(5, 5, dtype=torch.bool).tril() | (torch.arange(5)[:, None] == 0)
                       & (torch.arange(5) == 1))


def test_bidirectional_mask_builder_honours_the_and_function_and_padding(llama):
    padding = torch.tensor([[0, 1, 1, 1, 1]])
    same_half = lambda batch, head, q, kv: (q < 3) == (kv < 3)  # noqa: E731
    for impl in ("eager", "sdpa"):
        config = llama.config.__class__.from_dict(llama.config.to_dict())
        config._attn_implementation = impl
        mask = compat.bidirectional_mask(config=config, inputs_embeds=torch.empty(1, 5, 0), attention_mask=padding,
                                         and_mask_function=same_half)
        visible = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0
        half = torch.arange(5) < 3
        expected = (half[:, None] == half[None, :]) & padding.bool()
        assert torch.equal(visible, expected), impl


def _drift_errors():
    """Errors of the kinds a transformers API change produces, each raised for real by Python or transformers."""
    def unexpected_keyword():
        def forward(input_ids=None, past_key_values=None):
            return input_ids
        forward(cache=None)

    def missing_attribute():
        return transformers.PreTrainedModel.a_method_a_later_release_removed

    def removed_name():
        exec("from transformers import AClassALaterReleaseRemoved")

    def removed_module():
        exec("import transformers.a_module_a_later_release_removed")

    return [unexpected_keyword, missing_attribute, removed_name, removed_module]


def _user_errors():
    """Errors transformers (or the user's own code) raises on purpose: never transformers' fault."""
    def flash_attention_not_installed():  # transformers 5.25's words, raised on purpose
        raise ImportError("FlashAttention2 has been toggled on, but it cannot be used due to the following error: "
                          "the package for FlashAttention2 doesn't seem to be installed.")

    def bad_config_value():
        raise ValueError("`rope_scaling` must be a dictionary")

    def wrong_type():
        raise TypeError("expected a LongTensor of token ids")

    def missing_package():
        exec("import flash_attn_a_package_that_is_not_installed")

    return [flash_attention_not_installed, bad_config_value, wrong_type, missing_package]


@pytest.mark.parametrize("raise_error", _drift_errors() + _user_errors(), ids=lambda f: f.__name__)
def test_on_a_tested_release_every_error_passes_through(raise_error, monkeypatch):
    monkeypatch.setattr(compat, "TESTED_TRANSFORMERS", (compat.TESTED_TRANSFORMERS[0], compat.installed_transformers()))
    with pytest.raises(Exception) as plain:
        raise_error()
    with pytest.raises(type(plain.value), match=re.escape(str(plain.value))), compat.explain_newer_transformers():
        raise_error()


@pytest.mark.parametrize("raise_error", _drift_errors(), ids=lambda f: f.__name__)
def test_on_a_newer_release_api_drift_names_upgrade(raise_error, newer_transformers):
    with pytest.raises(Exception) as plain:
        raise_error()
    assert compat.is_api_drift(plain.value)
    with pytest.raises(RuntimeError, match=rf"tested up to transformers {re.escape(newer_transformers)}\) failed on "
                       rf"transformers {re.escape(transformers.__version__)}.*dlm-adapt upgrade CHECKPOINT_DIR"), \
            compat.explain_newer_transformers():
        raise_error()


@pytest.mark.parametrize("raise_error", _user_errors(), ids=lambda f: f.__name__)
def test_on_a_newer_release_user_errors_pass_through(raise_error, newer_transformers):
    with pytest.raises(Exception) as plain:
        raise_error()
    assert not compat.is_api_drift(plain.value)
    with pytest.raises(type(plain.value), match=re.escape(str(plain.value))), compat.explain_newer_transformers():
        raise_error()


def test_patch_releases_of_the_newest_tested_minor_count_as_tested(monkeypatch):
    monkeypatch.setattr(compat, "TESTED_TRANSFORMERS", ("5.5.0", "5.25.0"))
    assert not compat.newer_than_tested("5.25.3") and not compat.newer_than_tested("5.5.0")
    assert compat.newer_than_tested("5.26.0") and compat.newer_than_tested("6.0.0")


def test_tested_releases_are_in_order():
    releases = [compat._release(v) for v in compat.TESTED_TRANSFORMERS]
    assert releases == sorted(releases) and len(set(releases)) == len(releases)


def test_the_models_forward_names_upgrade_only_for_drift(converted, newer_transformers, monkeypatch):
    """In the model's own forward on a release newer than tested: an attribute a later release removed (simulated
    in the compat function that reads the decoder's signature) names `upgrade`; an attention implementation that
    is not installed stays transformers' own error about the user's setup."""
    from adapt.model import MaskedDiffusionLM, modeling_masked_diffusion

    model = MaskedDiffusionLM.from_pretrained(converted("llama")[1]).eval()
    monkeypatch.setattr(modeling_masked_diffusion, "cache_kwarg", lambda forward: forward.a_later_releases_attribute)
    with pytest.raises(RuntimeError, match="dlm-adapt upgrade CHECKPOINT_DIR.*a_later_releases_attribute"):
        model(torch.arange(4, 8)[None])
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here: the not-installed error cannot be produced")
    with pytest.raises(ImportError, match="FlashAttention2"):
        MaskedDiffusionLM.from_pretrained(converted("llama")[1], attn_implementation="flash_attention_2")


def test_cli_parses_arguments_without_torch():
    # the flags come from transformers' HfArgumentParser, which is light; torch takes seconds to import
    code = ("import sys, adapt.cli; adapt.cli.build_parser().parse_args(['convert', 'a', 'b']); "
            "print(sorted({'torch', 'bitsandbytes'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_kernels_notice_is_dropped_and_other_bitsandbytes_warnings_kept(caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels")
        logger.warning("a real bitsandbytes problem")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes problem"]
    proc = subprocess.run([sys.executable, "-c", "import adapt.training.recipe, peft, bitsandbytes"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "gemm_4bit_forward" not in proc.stderr, proc.stderr[-500:]


def test_activation_checkpointing_recomputes_layers_without_deprecation_warnings(recwarn):
    def grads(checkpointing):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("llama")).train()
        if checkpointing:
            compat.enable_activation_checkpointing(model)
        calls, mlp = [], model.model.layers[0].mlp
        forward = mlp.forward
        mlp.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)  # hooks do not fire on recompute
        model(torch.arange(4, 10)[None], labels=torch.arange(4, 10)[None]).loss.backward()
        return [p.grad for p in model.parameters()], len(calls)

    plain, plain_calls = grads(False)
    recomputed, calls = grads(True)
    assert (plain_calls, calls) == (1, 2)  # the layer ran again during backward
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning) and "checkpointing" in str(w.message)]
