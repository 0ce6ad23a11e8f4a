"""Block-diffusion decoding (`diffusion_generate` on a block checkpoint): the exact KV cache gives the AR parent
at B = 1 and the uncached block-causal path at B > 1, left-padded batches decode each row as alone, and a row
stops at its EOS."""

import pytest
import torch

import adapt
from adapt.model import MaskedDiffusionConfig, MaskedDiffusionLM
from adapt.model.block_masked_diffusion import block_diffusion_sample
from adapt.model.modeling_masked_diffusion import ModelDenoiser
from adapt.sampling import SamplingError
from tiny_models import ARCHS, save_tiny_source, tiny_config

B, MASK, N = 4, 5, 7  # N: not a multiple of B
PROMPTS = ([11, 12, 13, 14, 15], [21, 22])  # tails of 1 and 2 tokens in their last blocks


def _batch(prompts, pad=3):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _model(arch, block_size=B):
    torch.manual_seed(0)
    model = MaskedDiffusionLM(MaskedDiffusionConfig(text_config=tiny_config(arch, 100).to_dict(), mask_token_id=MASK,
                                                    block_size=block_size))
    model.set_attn_implementation("eager")
    return model.eval()


def _new(seq, width, eos=None):
    """A row's new tokens, up to and including its first EOS."""
    new = seq[width:].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


def _uncached(model, ids, mask, **kwargs):
    """The reference: the same block loop, every pass the whole canvas under the block-causal mask, no cache."""
    with torch.no_grad():
        return block_diffusion_sample(lambda padding: ModelDenoiser(model), ids, attention_mask=mask, block_size=B,
                                      mask_token_id=MASK, shift=model.config.shift, **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_block_size_1_greedy_is_the_causal_source_generate(tmp_path, arch):
    source = save_tiny_source(tmp_path / "src", arch)
    model, _ = adapt.load(adapt.convert(tmp_path / "src", tmp_path / "dlm", block_size=1))
    assert model.config.block_size == 1 and model.config.shift
    eos, n = source.generation_config.eos_token_id, 10
    alone = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        ar = source.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
        got = model.diffusion_generate(ids, max_new_tokens=n, return_dict_in_generate=True)
        assert _new(got.sequences[0], len(prompt), eos) == _new(ar[0], len(prompt), eos)
        assert got.nfe == len(_new(got.sequences[0], len(prompt), eos))  # one token per pass, then it stops
        alone.append(_new(ar[0], len(prompt), eos))
    ids, mask = _batch(PROMPTS)
    ar = source.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, pad_token_id=3)
    got = model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=n)
    for row in range(2):
        assert _new(ar[row], ids.shape[1], eos) == alone[row] == _new(got[row], ids.shape[1], eos)


OPTIONS = {"schedule": dict(steps=N), "two per pass": dict(steps=4), "threshold": dict(steps=N, threshold=0.03),
           "margin, cosine": dict(steps=4, remasking="margin", schedule="cosine")}


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_equals_uncached_and_batch_equals_alone(arch):
    model = _model(arch)
    ids, mask = _batch(PROMPTS)
    for name, options in OPTIONS.items():
        got = model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=N, return_dict_in_generate=True,
                                       **options)
        ref = _uncached(model, ids, mask, max_new_tokens=N, **options)
        assert torch.equal(got.sequences, ref.sequences), name
        assert got.row_nfe.tolist() == ref.row_nfe.tolist(), name
        assert got.sequences.shape == (2, ids.shape[1] + N) and (got.sequences[:, ids.shape[1]:] != MASK).all()
        for row, prompt in enumerate(PROMPTS):
            one = model.diffusion_generate(torch.tensor([prompt]), max_new_tokens=N, return_dict_in_generate=True,
                                           **options)
            assert one.sequences[0, len(prompt):].tolist() == got.sequences[row, ids.shape[1]:].tolist(), name
            assert int(one.row_nfe[0]) == int(got.row_nfe[row]) == one.nfe, name
        if "threshold" in options:
            assert max(got.committed_per_step) > 1  # really parallel
        assert got.cache_passes == 3  # the prompt's whole block, then the first two of three blocks


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_cached_equals_uncached_under_sdpa(arch):
    model = _model(arch)
    model.set_attn_implementation("sdpa")
    ids, mask = _batch(PROMPTS)
    for options in (dict(steps=N), dict(steps=N, threshold=0.03)):
        got = model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=N, **options)
        assert torch.equal(got, _uncached(model, ids, mask, max_new_tokens=N, **options).sequences)


def test_cached_equals_a_plain_greedy_loop():
    """An independent reference: one row, one token per pass, the most confident masked position of the block."""
    model = _model("llama")
    prompt = torch.tensor([PROMPTS[0]])
    canvas = torch.cat([prompt, torch.full((1, 8 + 3), MASK)], 1)  # position 5 starts; blocks [4, 8), [8, 12), [12, 16)
    with torch.no_grad():
        for start in (4, 8, 12):
            while (canvas[0, start:start + B] == MASK).any():
                logits = model(canvas).logits[0, start - 1:start + B - 1].double()  # shift
                logits[:, MASK] = -float("inf")
                p, tokens = logits.softmax(-1).max(-1)
                p[canvas[0, start:start + B] != MASK] = -1
                at = start + int(p.argmax())
                canvas[0, at] = tokens[at - start]
    got = model.diffusion_generate(prompt, max_new_tokens=10)
    assert got[0].tolist() == canvas[0, :15].tolist()


def test_a_row_stops_at_its_eos():
    model = _model("llama")
    ids, mask = _batch(PROMPTS)
    free = model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=12, return_dict_in_generate=True)
    width = ids.shape[1]
    eos = int(free.sequences[0, width + 2])  # make row 0's third new token its EOS
    assert eos not in free.sequences[1, width:].tolist()
    model.generation_config.eos_token_id = eos
    got = model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=12, return_dict_in_generate=True)
    first = got.sequences[0, width:].tolist().index(eos)
    upto = width + first + 1
    assert first <= 2 and got.sequences[0, :upto].tolist() == free.sequences[0, :upto].tolist()
    assert (got.sequences[0, width + first:] == eos).all()  # nothing but EOS after it
    assert int(got.row_nfe[0]) <= B < 12 and int(got.row_nfe[0]) == int(got.row_committed[0])
    assert torch.equal(got.sequences[1], free.sequences[1]) and int(got.row_nfe[1]) == 12
    alone = model.diffusion_generate(torch.tensor([PROMPTS[0]]), max_new_tokens=12, return_dict_in_generate=True)
    assert alone.nfe == int(got.row_nfe[0]) and alone.cache_passes == 1  # stopped: no later block stored
    late = model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=6)
    assert eos not in late[0, width:width + 6].tolist()  # min_new_tokens counts each row's own new tokens


def test_bad_block_options_are_refused():
    model = _model("llama")
    x = torch.tensor([PROMPTS[0]])
    with pytest.raises(SamplingError, match="leave block_length and kv_cache"):
        model.diffusion_generate(x, max_new_tokens=8, block_length=8)
    with pytest.raises(SamplingError, match="leave block_length and kv_cache"):
        model.diffusion_generate(x, max_new_tokens=8, kv_cache="prefix")
    with pytest.raises(SamplingError, match="infilling is not in block mode"):
        model.diffusion_generate(torch.tensor([[11, MASK, 13]]), max_new_tokens=4)
    with pytest.raises(SamplingError, match="exceeds the model's 64 positions"):
        model.diffusion_generate(x, max_new_tokens=60)
