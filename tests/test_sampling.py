"""The sampler: index alignment (shift on/off) against an oracle, LLaDA's reference algorithm, forward-pass
counts, parallel decoding, infilling, EOS handling, batch invariance and bad inputs."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import adapt
from adapt.model.sampling_masked_diffusion import EntropyBoundCommit
from adapt.sampling import SamplingError, commit_schedule, diffusion_sample
from tiny_models import save_tiny_source, write_word_runs

MASK, V = 99, 100


def oracle(target: torch.Tensor, shift: bool, sharpness: float = 20.0):
    """A model that knows `target`: the logit for position i (at i-1 when shifted) points at target[i], with a
    confidence that varies by position so every unmasking order is exercised."""
    def model_fn(canvas, attention_mask):
        logits = torch.zeros(*canvas.shape, V)
        conf = sharpness * (1 + torch.arange(canvas.shape[1]).flip(0) % 5)[None].float()
        want = F.one_hot(target, V).float() * conf[..., None]
        if shift:
            logits[:, :-1] = want[:, 1:]
        else:
            logits[:] = want
        return logits
    return model_fn


@pytest.mark.parametrize("shift", [True, False], ids=["shift", "no-shift"])
@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy", "random"])
@pytest.mark.parametrize("setting", [dict(block_length=8, steps=8), dict(block_length=4, steps=8),
                                     dict(block_length=8, steps=4, threshold=0.9), dict(block_length=8, steps=8,
                                                                                        schedule="cosine"),
                                     dict(block_length=8, steps=8, entropy_bound=0.5)],
                         ids=["one-block", "blocks", "threshold", "cosine", "entropy-bound"])
def test_decodes_the_oracle_target_exactly(shift, remasking, setting):
    target = torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    out = diffusion_sample(oracle(target, shift), target[:, :4], mask_token_id=MASK, shift=shift, max_new_tokens=8,
                           remasking=remasking, generator=torch.Generator().manual_seed(1), **setting)
    assert torch.equal(out.sequences, target)
    assert sum(out.committed_per_step) == 16


def test_entropy_bound_commits_the_longest_ranked_prefix_within_gamma():
    """EB-sampler: sorted by rank, entropies 0.1, 0.3, 0.5, 0.4 (nats): sum - max is 0, 0.1, 0.4, 0.8, so gamma 0.5
    commits the first three ranked and gamma 0.05 the best one only; unmasked positions never count."""
    def dist(h):  # a distribution over 2 tokens with entropy h
        p = torch.tensor(0.5)
        lo, hi = torch.tensor(1e-9), torch.tensor(0.5)
        for _ in range(100):
            p = (lo + hi) / 2
            if -(p * p.log() + (1 - p) * (1 - p).log()) < h:
                lo = p
            else:
                hi = p
        return torch.tensor([1 - p, p], dtype=torch.float64)

    probs = torch.stack([dist(h) for h in (0.5, 0.1, 0.6, 0.3, 0.4)])[None]  # position 2 is not masked
    masked = torch.tensor([[True, True, False, True, True]])
    ranks = torch.tensor([[2, 0, 4, 1, 3]])  # ranked: positions 1, 3, 0, 4 (then the unmasked 2)
    for gamma, committed in ((0.5, [1, 1, 0, 1, 0]), (0.05, [0, 1, 0, 0, 0]), (0.85, [1, 1, 0, 1, 1])):
        got = EntropyBoundCommit(gamma)(0, masked, ranks, probs, probs.max(-1).values)
        assert got[0].long().tolist() == committed, gamma


def test_entropy_bound_trades_passes_for_parallel_commits(tiny):
    model, _ = tiny
    x = torch.tensor([[1, 7]])
    one = model.diffusion_generate(x, max_new_tokens=8, steps=8, return_dict_in_generate=True)
    tight = model.diffusion_generate(x, max_new_tokens=8, entropy_bound=1e-9, return_dict_in_generate=True)
    loose = model.diffusion_generate(x, max_new_tokens=8, entropy_bound=1e9, return_dict_in_generate=True)
    assert torch.equal(tight.sequences, one.sequences) and tight.nfe == 8  # one per pass: the ranked order
    assert loose.nfe == 1 and loose.committed_per_step == [8]


def llada_generate(model_fn, prompt, steps, gen_length, block_length, mask_id):
    """LLaDA's low-confidence semi-autoregressive sampler at temperature 0, written from its paper and
    guideline: blocks left to right, steps/num_blocks steps each, an even number of tokens per step (the
    remainder to the first steps), confidence = softmax probability, −inf outside the current block."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id)
    x[:, : prompt.shape[1]] = prompt
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for b in range(num_blocks):
        lo, hi = prompt.shape[1] + b * block_length, prompt.shape[1] + (b + 1) * block_length
        block_masked = (x[:, lo:hi] == mask_id).sum(1, keepdim=True)
        base, rem = block_masked // steps_per_block, block_masked % steps_per_block
        num_transfer = base.repeat(1, steps_per_block)
        for i in range(num_transfer.shape[0]):
            num_transfer[i, : rem[i]] += 1
        for i in range(steps_per_block):
            mask_index = x == mask_id
            logits = model_fn(x, None)
            x0 = logits.argmax(-1)
            p = F.softmax(logits.to(torch.float64), dim=-1)
            x0_p = p.gather(-1, x0[..., None])[..., 0]
            x0_p[:, hi:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.full_like(x0_p, -float("inf")))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select = confidence[j].topk(int(num_transfer[j, i]))
                transfer[j, select] = True
            x[transfer] = x0[transfer]
    return x


def test_matches_the_llada_reference_on_a_tiny_model(tmp_path):
    save_tiny_source(tmp_path / "src", "llama")
    adapt.convert(tmp_path / "src", tmp_path / "dlm", shift=False)  # LLaDA is not shifted
    model, _ = adapt.load(tmp_path / "dlm")
    mask_id = model.config.mask_token_id

    def model_fn(x, attention_mask):
        logits = model(input_ids=x).logits
        logits[..., mask_id] = -float("inf")  # both samplers see a model that never predicts [MASK]
        return logits

    prompt = torch.randint(4, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for steps, gen_length, block_length in [(12, 12, 4), (8, 16, 8), (5, 10, 10)]:
            ref = llada_generate(model_fn, prompt, steps, gen_length, block_length, mask_id)
            ours = diffusion_sample(model_fn, prompt, mask_token_id=mask_id, shift=False, max_new_tokens=gen_length,
                                    steps=steps, block_length=block_length)
            assert torch.equal(ours.sequences, ref), (steps, gen_length, block_length)
            assert ours.nfe == steps


@pytest.fixture(scope="module")
def tiny(converted):
    return adapt.load(converted("llama")[1])


def test_forward_counts_and_determinism(tiny):
    model, _ = tiny
    prompt = torch.tensor([[1, 7, 8, 9]])
    kw = dict(max_new_tokens=12, stop_at_eos=False, return_dict_in_generate=True)
    a = model.diffusion_generate(prompt, steps=6, **kw)
    b = model.diffusion_generate(prompt, steps=6, **kw)
    assert torch.equal(a.sequences, b.sequences) and a.nfe == 6  # block = N, no threshold: exactly S passes
    one = model.diffusion_generate(prompt, steps=12, threshold=1.0, **kw)
    assert one.nfe == 12 and one.committed_per_step == [1] * 12  # tau = 1: one token per pass
    blocks = model.diffusion_generate(prompt, steps=6, block_length=4, **kw)
    assert blocks.nfe == 6 and blocks.committed_per_step == [2] * 6


@pytest.mark.parametrize("kwargs", [dict(), dict(block_length=4, steps=6), dict(threshold=0.2),
                                    dict(remasking="margin"), dict(remasking="entropy"),
                                    dict(block_length=4, steps=6, kv_cache="prefix"),
                                    dict(block_length=4, steps=12, threshold=0.2, kv_cache="dual")],
                         ids=["default", "blocks", "threshold", "margin", "entropy", "prefix-cache",
                              "dual-cache-threshold"])
def test_left_padded_batch_equals_each_prompt_alone(tiny, kwargs):
    model, _ = tiny
    prompts = [[1, 7, 8, 9, 10, 11], [1, 20, 21], [1, 30, 31, 32, 33]]
    width = max(map(len, prompts))
    ids = torch.tensor([[3] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=12, return_dict_in_generate=True,
                                     **kwargs)
    for row, p in enumerate(prompts):
        alone = model.diffusion_generate(torch.tensor([p]), max_new_tokens=12, return_dict_in_generate=True,
                                         **kwargs)
        assert torch.equal(batch.sequences[row, width - len(p):], alone.sequences[0]), row
        assert batch.row_nfe[row] == alone.nfe and batch.row_committed[row] == alone.row_committed[0], row


@pytest.mark.parametrize("n", [0, 6])
def test_infilling_keeps_prefix_and_suffix(tiny, n):
    model, _ = tiny
    m = model.config.mask_token_id
    text = torch.tensor([[1, 7, 8, m, m, m, 12, 13, m, 15]])
    out = model.diffusion_generate(text, max_new_tokens=n, steps=4 if n == 0 else 6, stop_at_eos=False)
    keep = text != m
    assert torch.equal(out[:, : text.shape[1]][keep], text[keep])
    assert not (out == m).any() and out.shape == (1, text.shape[1] + n)


def test_eos_finishes_a_row_and_min_new_tokens_forbids_early_eos():
    eos = 2
    target = torch.tensor([[1, 5, 6, 7, 8, eos, 10, 11, 12, 13, 14, 15, 16, 17]])
    out = diffusion_sample(oracle(target, True), target[:, :2], mask_token_id=MASK, shift=True, max_new_tokens=12,
                           steps=12, block_length=4, eos_token_id=eos)
    assert out.sequences[0, 5:].eq(eos).all()  # the rest of the row became EOS ...
    assert out.nfe == 4  # ... and decoding stopped after the first block (canvas 2-5 holds the EOS)
    late = diffusion_sample(oracle(target, True), target[:, :2], mask_token_id=MASK, shift=True, max_new_tokens=12,
                            steps=12, block_length=4, eos_token_id=eos, min_new_tokens=6)
    assert not late.sequences[0, 2:8].eq(eos).any()


def test_schedules_sum_to_n():
    for n, s in [(10, 3), (7, 7), (64, 8), (5, 10)]:
        lin, cos = commit_schedule(n, s, "linear"), commit_schedule(n, s, "cosine")
        assert sum(lin) == sum(cos) == n and max(lin) - min(lin) <= 1
        assert all(c >= 0 for c in cos)
    assert commit_schedule(10, 3) == [4, 3, 3]


def test_top_k_one_equals_greedy(tiny):
    model, _ = tiny
    prompt = torch.tensor([[1, 7, 8]])
    greedy = model.diffusion_generate(prompt, max_new_tokens=8)
    sampled = model.diffusion_generate(prompt, max_new_tokens=8, temperature=1.0, top_k=1,
                                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, sampled)


BAD = {
    "steps < 1": (dict(steps=0), "steps must be at least 1"),
    "N not divisible by B": (dict(max_new_tokens=10, block_length=4), "multiple of block_length"),
    "steps not divisible by blocks": (dict(max_new_tokens=12, block_length=4, steps=4), "multiple of the number of blocks"),
    "prompt beyond positions": (dict(max_new_tokens=70), "exceeds the model's 64 positions"),
    "entropy bound <= 0": (dict(max_new_tokens=8, entropy_bound=-1.0), r"entropy_bound .* must be > 0"),
    "threshold and entropy bound": (dict(max_new_tokens=8, threshold=0.9, entropy_bound=1.0), "choose one"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_sampling_arguments(tiny, case):
    model, _ = tiny
    kwargs, message = BAD[case]
    with pytest.raises(SamplingError, match=message):
        model.diffusion_generate(torch.tensor([[1, 7]]), **kwargs)


def test_model_without_mask_token_is_refused():
    with pytest.raises(SamplingError, match="no mask token"):
        diffusion_sample(oracle(torch.zeros(1, 4, dtype=torch.long), False), torch.tensor([[1]]), mask_token_id=None,
                         shift=False, max_new_tokens=3, steps=3)


@pytest.mark.slow
def test_generate_cli_json_and_errors(tiny, tmp_path, capfd):
    from adapt.cli import main

    model, tok = tiny
    path = tmp_path / "m"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    ok = subprocess.run([sys.executable, "-m", "adapt", "generate", str(path), "--prompt", "w1 w2", "--prompt",
                         "w3", "--max-new-tokens", "8", "--steps", "4", "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    rows = [json.loads(line) for line in ok.stdout.splitlines()]
    assert len(rows) == 2 and all({"text", "tokens", "nfe"} <= r.keys() for r in rows)
    assert rows[0]["nfe"] <= 4

    def run(*a):  # the command's function in this process (a new process costs ~5 s of imports)
        capfd.readouterr()
        code = main(["generate", str(path), *a])
        return subprocess.CompletedProcess(a, code, *capfd.readouterr())

    bad = run("--prompt", "w1", "--max-new-tokens", "10", "--block-length", "4")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("dlm-adapt: error:")
    infill = run("--infill", f"w1 w2 {tok.mask_token} {tok.mask_token} w5", "--steps", "2", "--json")
    assert infill.returncode == 0, infill.stderr
    filled = json.loads(infill.stdout)
    assert tok.mask_token not in filled["text"] and filled["text"].startswith("w1 w2")


@pytest.mark.slow
def test_threshold_below_one_needs_fewer_forwards_on_a_trained_model(tmp_path):
    """A tiny model trained on counting runs ("w10 w11 w12 ...") is confident about several positions at once."""
    from adapt.config import load_config

    save_tiny_source(tmp_path / "causal", "llama")
    write_word_runs(tmp_path / "train.txt", 300)
    final = adapt.train(load_config(None, [f"output_dir={tmp_path / 'run'}", f"model.path={tmp_path / 'causal'}",
                                           f"data.train={tmp_path / 'train.txt'}", "data.seq_length=16",
                                           "train.batch_size=16", "train.lr=1e-2", "max_steps=600", "eval_steps=0",
                                           "save_steps=0", "anneal.mode=none"]))
    model, tok = adapt.load(final)
    ids = tok(["w10 w11 w12"], return_tensors="pt").input_ids
    kw = dict(max_new_tokens=8, steps=8, stop_at_eos=False, return_dict_in_generate=True)
    one = model.diffusion_generate(ids, threshold=1.0, **kw)
    fast = model.diffusion_generate(ids, threshold=0.7, **kw)
    assert one.nfe == 8 and fast.nfe < one.nfe
    assert tok.decode(fast.sequences[0, 3:8]) == "w13 w14 w15 w16 w17"
    assert not (fast.sequences == model.config.mask_token_id).any()


@pytest.mark.parametrize("shift", [True, False], ids=["shift", "no-shift"])
def test_prefix_cache_is_exact_when_the_prefix_cannot_see_the_future(tmp_path, shift):
    """With causal attention the prefix keys/values never go stale, so cached decoding must equal uncached
    decoding token for token: this checks positions, padding, the shift offset and cache cropping."""
    from adapt.model import MaskedDiffusionLM

    save_tiny_source(tmp_path / "src", "llama")
    adapt.convert(tmp_path / "src", tmp_path / "dlm", shift=shift)
    model = MaskedDiffusionLM.from_pretrained(tmp_path / "dlm", bidirectional=False).eval()
    ids = torch.tensor([[3, 3, 1, 7, 8], [1, 20, 21, 22, 23]])
    mask = (ids != 3).long()
    kw = dict(attention_mask=mask, max_new_tokens=12, steps=12, block_length=4, stop_at_eos=False,
              return_dict_in_generate=True)
    plain = model.diffusion_generate(ids, **kw)
    cached = model.diffusion_generate(ids, kv_cache="prefix", **kw)
    assert torch.equal(cached.sequences, plain.sequences) and cached.nfe == plain.nfe == 12
    with pytest.raises(SamplingError, match="bidirectional"):
        model.diffusion_generate(ids, kv_cache="dual", **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("shift", [True, False], ids=["shift", "no-shift"])
@pytest.mark.parametrize("kv_cache", ["prefix", "dual"])
def test_kv_cache_pass_matches_the_full_pass_and_reuses_what_it_should(tmp_path, arch, shift, kv_cache):
    """A cached pass over an unchanged canvas gives the full pass's logits (positions, left padding, the reordered
    keys and their mask, shift, cropping: all must be right). After the refresh, a token changed inside the block
    changes the cached logits; one changed after the block changes them with "prefix" (rerun) but not with "dual"
    (its keys/values are reused)."""
    from adapt.model.modeling_masked_diffusion import DENOISERS

    save_tiny_source(tmp_path / "src", arch)
    adapt.convert(tmp_path / "src", tmp_path / "dlm", shift=shift)
    model, _ = adapt.load(tmp_path / "dlm")
    m = model.config.mask_token_id
    canvas = torch.tensor([[3, 3, 1, 7, 8, 9, m, m, m, m, m, m], [1, 20, 21, 22, 23, 24, m, m, m, m, m, m]])
    mask = torch.ones_like(canvas)
    mask[0, :2] = 0
    lo, hi = 6, 9
    full = DENOISERS[None](model)(canvas, mask, lo, hi)
    cache = DENOISERS[kv_cache](model)
    with torch.no_grad():
        torch.testing.assert_close(cache(canvas, mask, lo, hi), full)
        for _ in range(2):  # the second pass checks that the first one cropped its entries away
            torch.testing.assert_close(cache(canvas, mask, lo, hi), full, atol=1e-5, rtol=1e-5)
        inside, after = canvas.clone(), canvas.clone()
        inside[:, 7], after[:, 10] = 30, 30
        assert not torch.allclose(cache(inside, mask, lo, hi), full, atol=1e-4)
        assert torch.allclose(cache(after, mask, lo, hi), full, atol=1e-5) == (kv_cache == "dual")


def test_kv_cache_bidirectional_decodes_infills_and_refuses_sliding_windows(tiny, tmp_path):
    model, _ = tiny
    m = model.config.mask_token_id
    ids = torch.tensor([[1, 7, 8, 9]])
    for kv_cache in ("prefix", "dual"):
        out = model.diffusion_generate(ids, max_new_tokens=12, steps=6, block_length=4, kv_cache=kv_cache,
                                       stop_at_eos=False)
        assert torch.equal(out[:, :4], ids) and not (out == m).any()
        holes = torch.tensor([[1, m, m, 9, 10]])
        filled = model.diffusion_generate(holes, max_new_tokens=4, steps=4, kv_cache=kv_cache, stop_at_eos=False)
        assert torch.equal(filled[:, [0, 3, 4]], holes[:, [0, 3, 4]]) and not (filled == m).any()
    with pytest.raises(SamplingError, match="kv_cache must be"):
        model.diffusion_generate(ids, max_new_tokens=4, kv_cache="both")
    save_tiny_source(tmp_path / "src", "mistral")  # every layer is sliding-window
    adapt.convert(tmp_path / "src", tmp_path / "dlm")
    sliding, _ = adapt.load(tmp_path / "dlm")
    with pytest.raises(SamplingError, match="sliding-window"):
        sliding.diffusion_generate(ids, max_new_tokens=4, kv_cache="prefix")
