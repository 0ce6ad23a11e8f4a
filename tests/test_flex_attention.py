"""flex attention (`attn_implementation="flex_attention"`): the same logits, losses and gradients as sdpa/eager for
every mask dlm-adapt builds (annealing, the block-causal canvas, the 2L layout, block decoding's cached mask), with
left padding and packed documents; and the sdpa fast paths of annealing build no mask.

flex runs here in eager mode (torch's reference implementation of the same BlockMask and mask functions):
compiling it costs minutes per shape on these CPUs. The compiled kernels are checked on a GPU
(benchmarks/gpu_check.sh)."""

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from adapt import AdaptError
from adapt.attention import check_attn_implementation
from adapt.model import MaskedDiffusionConfig, MaskedDiffusionLM
from adapt.model.block_masked_diffusion import BlockCacheDenoiser, block_diffusion_sample, two_l_logits
from adapt.training.annealing import annealed_attention_mask, annealed_inputs
from adapt.training.blocks import documents
from tiny_models import ARCHS, tiny_config

MASK, EOS = 5, 2


@pytest.fixture(autouse=True)
def eager_flex(monkeypatch):
    """transformers compiles flex attention and its BlockMask builder; here both run uncompiled."""
    import transformers.masking_utils
    from torch.nn.attention import flex_attention as flex
    from transformers.integrations.flex_attention import WrappedFlexAttention

    build = flex.create_block_mask
    monkeypatch.setattr(transformers.masking_utils, "create_block_mask",
                        lambda *args, _compile=False, **kwargs: build(*args, **kwargs))
    monkeypatch.setattr(WrappedFlexAttention, "__call__", lambda self: flex.flex_attention)
    monkeypatch.setattr(flex, "_warn_once", lambda *args, **kwargs: None)
    # torch refuses flex backward on CPU up front (its compiled CPU kernels have none); the reference
    # implementation these tests run has one
    monkeypatch.setattr(flex, "_validate_device", lambda *args: None)


def _model(arch, impl, block_size=None, drafter=None):
    from adapt.model.transformers_compat import decoder_class

    if impl == "flex_attention" and not getattr(decoder_class(tiny_config(arch, 100)), "_supports_flex_attn", False):
        pytest.skip(f"transformers' {arch} has no flex attention path")
    torch.manual_seed(0)
    model = MaskedDiffusionLM(MaskedDiffusionConfig(text_config=tiny_config(arch, 100).to_dict(), mask_token_id=MASK,
                                                    block_size=block_size, drafter=drafter))
    model.set_attn_implementation(impl)
    return model.eval()


def _dense(arch):
    return "eager" if arch == "gemma2" else "sdpa"  # transformers' Gemma2 has no sdpa path


def _batch(length=12):
    x = torch.randint(6, 100, (2, length), generator=torch.Generator().manual_seed(0))
    x[0, 4] = x[0, 9] = EOS  # packed documents in row 0
    pad = torch.ones_like(x)
    pad[1, :3] = 0  # left padding in row 1
    return x, pad


def _noised(x):
    return x.masked_fill(torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.5, MASK)


@pytest.mark.parametrize("arch", ARCHS)
def test_flex_gives_the_dense_logits_for_every_mask(arch):
    x, pad = _batch()
    real = pad.bool()
    out = {}
    for impl in (_dense(arch), "flex_attention"):
        full, blocks = _model(arch, impl), _model(arch, impl, block_size=4)
        with torch.no_grad():
            out[impl] = [full(x, **annealed_inputs(full, pad, ratio, torch.Generator().manual_seed(2)),
                              position_ids=(pad.cumsum(-1) - 1).clamp_min(0)).logits[real]
                         for ratio in (0.0, 0.3, 1.0)]
            out[impl].append(blocks(x, attention_mask=pad).logits[real])  # the block-causal canvas
            out[impl].append(two_l_logits(blocks, _noised(x), x, pad, document_ids=documents(x, ("eos", EOS)))[real])
    for dense, flex in zip(out[_dense(arch)], out["flex_attention"]):
        torch.testing.assert_close(flex, dense, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["annealing", "2L"])
def test_a_training_step_has_the_same_loss_and_gradients(layout):
    from adapt.training.objective import ObjectiveConfig, diffusion_loss, noised_batch

    x, pad = _batch()
    grads, losses = {}, {}
    for impl in ("sdpa", "flex_attention"):
        model = _model("qwen2", impl, block_size=4 if layout == "2L" else None).train()
        generator = torch.Generator().manual_seed(3)
        x_t, x0, masked, maskable, t = noised_batch(x, pad.bool(), ObjectiveConfig(), MASK, True, generator,
                                                    block_size=4 if layout == "2L" else None)
        if layout == "2L":
            logits = two_l_logits(model, x_t, x0, pad, document_ids=documents(x0, ("eos", EOS)))
        else:
            logits = model(x_t, **annealed_inputs(model, pad, 0.3, generator),
                           position_ids=(pad.cumsum(-1) - 1).clamp_min(0)).logits
        loss = diffusion_loss(logits, x0, masked, maskable, t, ObjectiveConfig(), shift=True, mask_token_id=MASK)
        loss.backward()
        losses[impl] = loss.item()
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert losses["flex_attention"] == pytest.approx(losses["sdpa"], abs=1e-5)
    assert grads["flex_attention"].keys() == grads["sdpa"].keys()
    for name, grad in grads["sdpa"].items():
        torch.testing.assert_close(grads["flex_attention"][name], grad, atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_block_decoding_with_flex_commits_the_dense_tokens(arch):
    prompt = torch.randint(6, 100, (2, 6), generator=torch.Generator().manual_seed(4))
    pad = torch.ones_like(prompt)
    pad[1, :2] = 0
    out = {}
    for impl in (_dense(arch), "flex_attention"):
        model = _model(arch, impl, block_size=4)
        with torch.no_grad():
            out[impl] = block_diffusion_sample(lambda p: BlockCacheDenoiser(model, p), prompt, block_size=4,
                                               mask_token_id=MASK, shift=True, max_new_tokens=8, steps=8,
                                               attention_mask=pad).sequences
    assert torch.equal(out["flex_attention"], out[_dense(arch)])


def test_sdpa_fast_paths_build_no_mask(monkeypatch):
    """Ratio 0 runs the causal path and ratio 1 the bidirectional one: without padding sdpa gets no mask tensor
    (its fused kernels), and ratio 0 is exactly the causal model, with no random draw."""
    model = _model("llama", "sdpa")
    seen = []
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, kwargs.get("is_causal", module.is_causal)))
        return original(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
    x = torch.randint(6, 100, (2, 12))
    pad = torch.ones_like(x)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    with torch.no_grad():
        causal = model(x, **annealed_inputs(model, pad, 0.0, generator)).logits
        assert torch.equal(generator.get_state(), state)  # nothing drawn
        assert [causal_flag for _, causal_flag in seen] == [True, True]
        full = model(x, **annealed_inputs(model, pad, 1.0, generator)).logits
        assert [causal_flag for _, causal_flag in seen[2:]] == [False, False]
        assert all(mask is None for mask, _ in seen)
        torch.testing.assert_close(causal, model(x, is_causal=True).logits, atol=0, rtol=0)
        torch.testing.assert_close(full, model(x).logits, atol=0, rtol=0)


def test_annealing_mask_is_boolean_and_one_draw_of_the_old_stream():
    """The sdpa mask stays booleans (no float per row), and the draw is the one earlier releases made, so a
    run's noise stream, and so its trajectory, is unchanged."""
    model = _model("llama", "sdpa")
    length, ratio = 16, 0.4
    mask = annealed_attention_mask(model, torch.ones(2, length, dtype=torch.long), ratio,
                                   torch.Generator().manual_seed(5))
    assert mask.dtype == torch.bool
    future = torch.rand(length, length, generator=torch.Generator().manual_seed(5)) < ratio
    expected = future.triu(1) | torch.ones(length, length, dtype=torch.bool).tril()
    assert torch.equal(mask[0, 0], expected) and torch.equal(mask[1, 0], expected)


def test_flex_unavailable_is_one_clear_error(monkeypatch):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_torch_flex_attn_available", lambda: False)
    with pytest.raises(AdaptError, match=r"'flex_attention' is not available here .*use model.attn_implementation=sdpa"):
        check_attn_implementation("flex_attention", "model.attn_implementation")


def _write_text(path):
    words = [f"w{i % 90}" for i in range(2000)]
    path.write_text("\n\n".join(" ".join(words[i:i + 12]) for i in range(0, 2000, 12)))


def _train_cfg(root, dlm, out, *overrides):
    from adapt.config import load_config

    base = [f"output_dir={out}", f"model.path={dlm}", f"data.train={root / 'train.txt'}", "data.seq_length=16",
            "train.batch_size=4", "train.lr=3e-3", "max_steps=4", "eval_steps=0", "save_steps=0", "sample_steps=0",
            "model.attn_implementation=flex_attention"]
    return load_config(None, base + list(overrides))


@pytest.mark.parametrize("mode", [["anneal.anneal_steps=3"], ["anneal.mode=none", "block.size=4"]],
                         ids=["annealing", "block"])
def test_flex_training_resumes_bit_exactly(converted, tmp_path, mode):
    import json

    import adapt

    _, dlm = converted("llama")
    _write_text(tmp_path / "train.txt")
    adapt.train(_train_cfg(tmp_path, dlm, tmp_path / "straight", *mode))
    assert adapt.train(_train_cfg(tmp_path, dlm, tmp_path / "split", *mode, "stop_after=2")) is None
    adapt.train(_train_cfg(tmp_path, dlm, tmp_path / "split", *mode, "resume=true"))
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("straight", "split")]
    assert len(losses[0]) == 4 and losses[1] == losses[0]  # bit-identical, across the end of annealing


def test_flex_training_on_cpu_is_refused_in_one_line(converted, tmp_path, monkeypatch):
    import adapt

    monkeypatch.undo()  # torch's own CPU guard back
    _, dlm = converted("llama")
    _write_text(tmp_path / "train.txt")
    with pytest.raises(AdaptError, match=r"'flex_attention' cannot train on cpu .*use model.attn_implementation=sdpa"):
        adapt.train(_train_cfg(tmp_path, dlm, tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before any output


def test_speculative_decoding_refuses_flex():
    """A drafter's fused round builds its dense mask by hand (eager/sdpa only): flex is refused there, not run."""
    from adapt.model.speculative_masked_diffusion import check_speculative

    model = _model("llama", "flex_attention", block_size=4, drafter={"rank": 2, "alpha": 4, "targets": ["q_proj"]})
    with pytest.raises(ValueError, match="'flex_attention' cannot take the block-diffusion mask.*'eager', 'sdpa'"):
        check_speculative(model, 2)
