"""Block-diffusion decoding (`diffusion_generate` on a block checkpoint): the exact KV cache gives the AR parent
at B = 1 and the uncached block-causal path at B > 1, left-padded batches decode each row as alone, and a row
stops at its EOS."""

import json

import pytest
import torch

import adapt
from adapt.model import MaskedDiffusionConfig, MaskedDiffusionLM
from adapt.model.block_masked_diffusion import block_diffusion_sample
from adapt.model.modeling_masked_diffusion import ModelDenoiser
from adapt.errors import AdaptError
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
           "margin, cosine": dict(steps=4, remasking="margin", schedule="cosine"),
           "sub-blocks": dict(steps=N, sub_block=2), "sub-blocks, threshold": dict(steps=N, sub_block=2, threshold=0.03),
           "entropy bound": dict(steps=N, entropy_bound=9.0)}


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
        if "threshold" in options or "entropy_bound" in options:
            assert max(got.committed_per_step) > 1  # really parallel
        if "sub_block" in options:  # a sub-block is committed before the next one starts
            first = [h[0, len(PROMPTS[1]):] for h in model.diffusion_generate(
                torch.tensor([PROMPTS[1]]), max_new_tokens=N, return_dict_in_generate=True, return_history=True,
                **options).history]
            # PROMPTS[1] fills positions 2..3 of its block: new tokens 0-1 are its second sub-block, 2-3 the next
            done_at = [next(i for i, h in enumerate(first) if (h[lo:hi] != MASK).all()) for lo, hi in ((0, 2), (2, 4))]
            assert all((first[i][2:4] == MASK).all() for i in range(done_at[0] + 1)) and done_at[0] < done_at[1]
        assert got.cache_hits > 0 and got.positions_computed > 0


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
    # row 0 left the batch after its first block: the later passes ran row 1 alone
    assert got.positions_computed < free.positions_computed and got.nfe == free.nfe
    alone = model.diffusion_generate(torch.tensor([PROMPTS[0]]), max_new_tokens=12, return_dict_in_generate=True)
    assert alone.nfe == int(got.row_nfe[0])
    late = model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=6)
    assert eos not in late[0, width:width + 6].tolist()  # min_new_tokens counts each row's own new tokens


def test_bad_block_options_are_refused():
    model = _model("llama")
    x = torch.tensor([PROMPTS[0]])
    with pytest.raises(SamplingError, match="leave block_length and kv_cache"):
        model.diffusion_generate(x, max_new_tokens=8, block_length=8)
    with pytest.raises(SamplingError, match="leave block_length and kv_cache"):
        model.diffusion_generate(x, max_new_tokens=8, kv_cache="prefix")
    with pytest.raises(SamplingError, match=r"sub_block \(3\) must divide the block size \(4\)"):
        model.diffusion_generate(x, max_new_tokens=8, sub_block=3)
    with pytest.raises(SamplingError, match="entropy_bound .* must be > 0"):
        model.diffusion_generate(x, max_new_tokens=8, entropy_bound=0.0)
    with pytest.raises(SamplingError, match="batch size 1"):
        model.diffusion_generate(*_batch(PROMPTS), max_new_tokens=8, streamer=Collect())
    with pytest.raises(SamplingError, match="cannot show holes"):
        model.diffusion_generate(torch.tensor([[11, MASK, 13]]), max_new_tokens=4, streamer=Collect())
    full = _model("llama", block_size=None)
    with pytest.raises(SamplingError, match="this one is full-sequence: use block_length"):
        full.diffusion_generate(x, max_new_tokens=8, sub_block=2)
    with pytest.raises(SamplingError, match="exceeds the model's 64 positions"):
        model.diffusion_generate(x, max_new_tokens=60)


class Collect:
    """A streamer with transformers' protocol that records what it is given."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streaming_hands_over_each_block_once_final():
    model = _model("llama")
    prompt = torch.tensor([PROMPTS[0]])  # 5 tokens: 1 in a partial block, then new tokens 3 + 4 + 4 + 1
    history = model.diffusion_generate(prompt, max_new_tokens=12, return_dict_in_generate=True,
                                       return_history=True)
    seen = Collect()
    got = model.diffusion_generate(prompt, max_new_tokens=12, streamer=seen)
    assert seen.ended and seen.chunks[0] == PROMPTS[0]
    assert [len(c) for c in seen.chunks[1:]] == [3, 4, 4, 1]
    assert sum(seen.chunks[1:], []) == got[0, 5:].tolist() == history.sequences[0, 5:].tolist()
    for i, chunk in enumerate(seen.chunks[1:-1]):  # each chunk was final when handed over: never changed later
        assert all(MASK not in h[0, 5:5 + 3 + 4 * i].tolist() for h in history.history[3 + 4 * i - 1:])
    eos = got[0, 5 + 4].item()  # stop at the second block: the stream ends with EOS, as generate's does
    model.generation_config.eos_token_id = eos
    seen = Collect()
    model.diffusion_generate(prompt, max_new_tokens=12, streamer=seen)
    flat = sum(seen.chunks[1:], [])
    assert flat == got[0, 5:5 + flat.index(eos) + 1].tolist() and flat.count(eos) == 1


def test_streaming_full_sequence_blocks():
    model = _model("llama", block_size=None)
    prompt = torch.tensor([PROMPTS[0]])
    seen = Collect()
    got = model.diffusion_generate(prompt, max_new_tokens=8, steps=8, block_length=4, streamer=seen)
    assert [len(c) for c in seen.chunks] == [5, 4, 4] and sum(seen.chunks[1:], []) == got[0, 5:].tolist()


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_infilling_in_block_mode(arch):
    """Holes are filled block by block: a hole sees its own block on both sides and the blocks before, never a
    later block; cached = uncached, and a batch = each row alone."""
    model = _model(arch)
    texts = ([11, 12, 13, 14, 15, MASK, 17, MASK, 19, 20, 21], [21, MASK, 23, 24, 25, 26])
    ids, mask = _batch(texts)
    for n in (0, 3):
        got = model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=n, return_dict_in_generate=True)
        ref = _uncached(model, ids, mask, max_new_tokens=n, steps=max(n, 2))
        assert torch.equal(got.sequences, ref.sequences) and (got.sequences != MASK).all()
        for row, text in enumerate(texts):
            one = model.diffusion_generate(torch.tensor([text]), max_new_tokens=n)
            assert one[0].tolist() == got.sequences[row, ids.shape[1] - len(text):].tolist()
    # row 0: the holes sit in block [4, 8); tokens 8.. are a later block, which the fill must not see
    filled = model.diffusion_generate(torch.tensor([texts[0]]), max_new_tokens=0)
    later = model.diffusion_generate(torch.tensor([texts[0][:8] + [40, 41, 42]]), max_new_tokens=0)
    assert filled[0, :8].tolist() == later[0, :8].tolist()


def test_generate_streams_blocks_from_the_cli_and_the_python_api(tmp_path, capsys):
    from adapt.cli import main
    from adapt.sampling.generate import stream

    save_tiny_source(tmp_path / "src", "llama")
    path = str(adapt.convert(tmp_path / "src", tmp_path / "dlm", block_size=4))
    args = ["generate", path, "--prompt", "w1 w2 w3", "--max-new-tokens", "12", "--min-new-tokens", "12"]
    assert main(args + ["--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["cache_hits"] > 0 and whole["positions_computed"] > 0
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == whole["text"] + "\n"  # TextStreamer ends with a newline
    pieces = list(stream(path, "w1 w2 w3", max_new_tokens=12, min_new_tokens=12))
    assert "".join(pieces) == whole["text"] and len([p for p in pieces if p]) > 1
    assert main(args + ["--stream", "--json"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("dlm-adapt: error: --stream prints text as it is "
                                                                "decoded: it cannot be combined with --json")
    with pytest.raises(AdaptError, match="sub_block"):  # a failure in the decoding thread reaches the caller
        list(stream(path, "w1", max_new_tokens=4, sub_block=3))
