"""Speculative decoding (`diffusion_generate(..., speculative=True)`): whatever the drafter proposes, greedy output
is the causal source's `generate(do_sample=False)` token for token, alone and in a left-padded batch, for every
architecture and draft lengths 1, 2, 4, 8; the parent's KV cache (the only one) is rolled back exactly; every
forward (one per round: verify and draft fused) is counted."""

import pytest
import torch

import adapt
from adapt.model import MaskedDiffusionConfig, MaskedDiffusionLM
from adapt.model.drafter_masked_diffusion import drafter_targets, drafter_training_logits, fused_forward
from adapt.model.speculative_masked_diffusion import HoleyCache
from adapt.sampling import SamplingError
from tiny_models import ARCHS, save_tiny_source, tiny_config

PROMPTS = ([11, 12, 13, 14, 15], [21, 22], [31, 32, 33])  # tails of 1, 2 and 3 tokens in blocks of 4
DRAFTS = (1, 2, 4, 8)
N = 12


def _new(seq, width, eos=None):
    new = seq[width:].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


def _batch(prompts, pad=3):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _trained(model, seed=1):
    """A drafter adapter with nonzero weights everywhere (B included): drafts that differ from the untrained
    conversion's, as a trained drafter's would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.drafter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _with_drafter(model, rank=4):
    """The converted model (same weights) with a new drafter adapter of rank `rank` in its config and modules."""
    config = MaskedDiffusionConfig(**{**model.config.to_dict(), "text_config": model.config.text_config.to_dict(),
                                      "drafter": {"rank": rank, "alpha": 8, "targets": drafter_targets(model.decoder)}})
    drafter = MaskedDiffusionLM(config)
    drafter.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("drafter.")},
                            strict=False)
    drafter.set_attn_implementation(model.config.text_config._attn_implementation)
    drafter.generation_config = model.generation_config
    return drafter.eval()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"spec-{arch}")
            source = save_tiny_source(root / "src", arch)
            model, _ = adapt.load(adapt.convert(root / "src", root / "dlm", block_size=4, drafter=True),
                                  attn_implementation="eager")  # an untrained drafter: it drafts as the conversion
            cache[arch] = source, model.eval()
        return cache[arch]

    return get


def _reference(source, eos):
    alone = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        ar = source.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N,
                             pad_token_id=3)
        alone.append(_new(ar[0], len(prompt), eos))
    return alone


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_is_the_source_generate_alone_and_batched(sources, arch):
    source, model = sources(arch)
    eos = source.generation_config.eos_token_id
    expected = _reference(source, eos)
    ids, mask = _batch(PROMPTS)
    for drafter in (model, _trained(_with_drafter(model))):
        for k in DRAFTS:
            for prompt, want in zip(PROMPTS, expected):
                got = drafter.diffusion_generate(torch.tensor([prompt]), max_new_tokens=N, speculative=True,
                                                 draft_length=k, return_dict_in_generate=True)
                assert _new(got.sequences[0], len(prompt), eos) == want, (k, prompt)
                assert got.nfe == int(got.row_rounds[0]) + 1 == int(got.row_nfe[0])  # one forward per round
                assert int(got.row_committed[0]) == len(want)
            got = drafter.diffusion_generate(ids, attention_mask=mask, max_new_tokens=N, speculative=True,
                                             draft_length=k)
            for row, want in enumerate(expected):
                assert _new(got[row], ids.shape[1], eos) == want, (k, row)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_right_guesses_commit_the_parents_next_token_and_stay_exact(sources, arch, monkeypatch):
    """`guess_bonus` with an oracle for guesses (the parent's true token, for the even rows of the batch only, so
    that rows with and without a right guess share rounds): the output is still the parent's greedy text, rounds
    with a right guess commit one token more, and fewer forwards are needed than without guessing."""
    import sys

    source, model = sources(arch)
    expected = [source.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                do_sample=False, max_new_tokens=N, eos_token_id=None,
                                pad_token_id=3)[0, len(p):].tolist() for p in PROMPTS]
    spec = sys.modules[type(model).__module__.replace("modeling_", "speculative_")]
    state = {"rows": None}
    commit = spec._commit

    def tracked(out, step, rows, *args):  # which original row each batch row is, round by round
        still = commit(out, step, rows, *args)
        state["rows"] = [rows[i] for i in still]
        return still

    def oracle(self, logits, new_index, drafts):  # a guess per position of `logits` (with shift, one past drafts)
        truth = [expected[r] + [0] * 64 for r in state["rows"]]
        return torch.tensor([[truth[b][i] if state["rows"][b] % 2 == 0 else 0 for i in row[:logits.shape[1]].tolist()]
                             for b, row in enumerate(new_index)], device=drafts.device)

    monkeypatch.setattr(spec, "_commit", tracked)
    monkeypatch.setattr(spec.TokenChoice, "guesses", oracle)
    ids, mask = _batch(PROMPTS)
    for k in (1, 2, 4):
        state["rows"] = list(range(len(PROMPTS)))
        got = model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=N, speculative=True,
                                       draft_length=k, stop_at_eos=False, return_dict_in_generate=True)
        assert [got.sequences[row, ids.shape[1]:].tolist() for row in range(len(PROMPTS))] == expected, k
        assert int(got.row_guessed[0]) > 0 and int(got.row_guessed[1]) == 0
        state["rows"] = [0]
        alone = model.diffusion_generate(torch.tensor([PROMPTS[0]]), max_new_tokens=N, speculative=True,
                                         draft_length=k, stop_at_eos=False, return_dict_in_generate=True)
        plain = model.diffusion_generate(torch.tensor([PROMPTS[0]]), max_new_tokens=N, speculative=True,
                                         draft_length=k, stop_at_eos=False, return_dict_in_generate=True,
                                         guess_bonus=False)
        assert alone.sequences[0, len(PROMPTS[0]):].tolist() == expected[0] == plain.sequences[0, -N:].tolist()
        assert int(alone.row_guessed[0]) > 0 and alone.nfe < plain.nfe and int(plain.row_guessed[0]) == 0
        # a perfect guesser is right in every verifying round: after a rejection, and after all k accepted
        assert model.config.shift and int(alone.row_guessed[0]) == int(alone.row_rounds[0])
        # sampling's path, with top_k=1: the parent's distribution is its argmax, so the output is its greedy text
        state["rows"] = list(range(len(PROMPTS)))
        sampled = model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=N, speculative=True,
                                           draft_length=k, stop_at_eos=False, temperature=0.7, top_k=1,
                                           generator=torch.Generator().manual_seed(0))
        assert [sampled[row, ids.shape[1]:].tolist() for row in range(len(PROMPTS))] == expected, k


def test_statistics_count_what_happened(sources):
    """Each round is one forward; the first (the prompt's prefill) only drafts and yields the parent's first token,
    each later one verifies the drafts and yields the accepted ones plus the parent's token; a draft position
    counts as accepted only with every position before it."""
    _, model = sources("llama")
    got = model.diffusion_generate(torch.tensor([PROMPTS[0]]), max_new_tokens=N, speculative=True, draft_length=4,
                                   return_dict_in_generate=True, stop_at_eos=False)
    rounds, accepted = int(got.row_rounds[0]), got.row_accepted_at[0]
    assert got.nfe == rounds + 1 == int(got.row_nfe[0]) == len(got.committed_per_step)
    assert int(accepted.sum()) + rounds + 1 >= N > int(accepted.sum()) + rounds + 1 - 5  # the last may overshoot
    assert all(accepted[i] >= accepted[i + 1] for i in range(3))
    assert got.tokens_per_forward == pytest.approx(N / got.nfe)
    torch.testing.assert_close(got.acceptance[0], accepted.double() / rounds)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_rolled_back_entries_leave_the_cache_exact(sources, arch):
    """Verify 3 drafts, keep 1 (row 0) and 2 (row 1): the next round's parent logits are those of a fresh causal
    forward over the kept text, both for the entry every row rejects (cropped) and for one only row 0 rejects (a
    hole); the masks of both rounds leave nothing behind, and the drafts are the training view's."""
    _, model = sources(arch)
    model = _trained(_with_drafter(model))
    ids, mask = _batch(PROMPTS[:2])
    drafts = torch.tensor([[40, 41, 42], [50, 51, 52]])
    cache = HoleyCache(2, ids.device)
    with torch.no_grad():
        fused_forward(model, cache, torch.cat([ids, drafts], 1), torch.cat([mask, torch.ones_like(drafts)], 1), 3, 2)
        assert cache.kv.get_seq_length() == cache.mask.shape[1] == ids.shape[1] + 3
        cache.truncate(3, torch.tensor([1, 2]))
        assert cache.mask.shape[1] == ids.shape[1] + 2 and cache.mask.sum(1).tolist() == [len(PROMPTS[0]) + 1,
                                                                                          len(PROMPTS[1]) + 2]
        nxt = torch.tensor([[60, 61], [70, 71]])
        got, groups = fused_forward(model, cache, nxt, None, 1, 2)  # no padding: decoding's rounds after the first
        for row, kept in enumerate(([40], [50, 51])):
            text = list(PROMPTS[row]) + kept + nxt[row].tolist()
            fresh = model(torch.tensor([text]), is_causal=True).logits[0, -2:]
            torch.testing.assert_close(got[row], fresh, atol=1e-5, rtol=0)
            # the drafts too: the group after each clean token is the training view's at that cut
            student, _ = drafter_training_logits(model, torch.tensor([text + [90, 91, 92]]), None,
                                                 torch.tensor([[len(text), len(text) + 1]]), 2)
            torch.testing.assert_close(groups[row], student[0], atol=1e-5, rtol=0)


def test_bad_speculative_options_are_refused(sources, tmp_path):
    _, model = sources("llama")
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(SamplingError, match="draft length must be at least 1"):
        model.diffusion_generate(ids, max_new_tokens=4, speculative=True, draft_length=0)
    with pytest.raises(SamplingError, match="pass speculative=True"):
        model.diffusion_generate(ids, max_new_tokens=4, draft_length=2)
    with pytest.raises(SamplingError, match="leave threshold unset"):
        model.diffusion_generate(ids, max_new_tokens=4, speculative=True, threshold=0.9)
    holes = ids.clone()
    holes[0, 2] = model.config.mask_token_id
    with pytest.raises(SamplingError, match="cannot fill holes"):
        model.diffusion_generate(holes, max_new_tokens=4, speculative=True)
    torch.manual_seed(0)
    full = MaskedDiffusionLM(MaskedDiffusionConfig(text_config=tiny_config("llama", 100).to_dict(),
                                                   mask_token_id=5)).eval()
    with pytest.raises(SamplingError, match="needs a drafter, and this checkpoint has none"):
        full.diffusion_generate(ids, max_new_tokens=4, speculative=True)
    # a block checkpoint without a drafter: its causal mode is not its source model once trained, so it is refused
    # as well (before 0.8.0 it decoded, with its own causal mode as the verifier)
    block = MaskedDiffusionLM(MaskedDiffusionConfig(text_config=tiny_config("llama", 100).to_dict(), mask_token_id=5,
                                                    block_size=4)).eval()
    with pytest.raises(SamplingError, match="needs a drafter, and this checkpoint has none"):
        block.diffusion_generate(ids, max_new_tokens=4, speculative=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sampling_through_the_loop(sources, arch):
    """The whole sampling path (drafts drawn from q, accept with min(1, p/q), residual draws): with top_k=1 the
    parent's distribution is its argmax alone, so the output must be its greedy text, whatever the drafter
    proposes; with a seeded generator the output repeats, and a batch runs."""
    source, model = sources(arch)
    eos = source.generation_config.eos_token_id
    expected = _reference(source, eos)
    drafter = _trained(_with_drafter(model))
    ids, mask = _batch(PROMPTS)
    for k in (1, 4):
        got = drafter.diffusion_generate(ids, attention_mask=mask, max_new_tokens=N, speculative=True,
                                         draft_length=k, temperature=1.3, top_k=1,
                                         generator=torch.Generator().manual_seed(0))
        assert [_new(got[row], ids.shape[1], eos) for row in range(len(PROMPTS))] == expected
        runs = [drafter.diffusion_generate(ids, attention_mask=mask, max_new_tokens=N, speculative=True,
                                           draft_length=k, temperature=0.9, top_p=0.9,
                                           generator=torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)]
        assert torch.equal(runs[0], runs[1])
        assert not (runs[0][:, ids.shape[1]:] == model.config.mask_token_id).any()


def test_streaming_hands_over_each_rounds_tokens(sources):
    _, model = sources("llama")

    class Collect:
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.chunks.append("end")

    streamer = Collect()
    out = model.diffusion_generate(torch.tensor([PROMPTS[0]]), max_new_tokens=N, speculative=True, draft_length=4,
                                   streamer=streamer, stop_at_eos=False)
    assert streamer.chunks[0] == list(PROMPTS[0]) and streamer.chunks[-1] == "end"
    assert sum(streamer.chunks[1:-1], []) == out[0, len(PROMPTS[0]):].tolist()
