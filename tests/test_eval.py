"""`adapt.evaluate` / `dlm-adapt eval`: metric code against closed forms on stub models, comparability of the AR
NLL and the ELBO, and the CLI."""

import json
import math
import random
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

import adapt
from adapt import AdaptError
from adapt.cli import main
from adapt.evaluation.decoding import repeat_task
from adapt.training.likelihood import causal_nll, diffusion_elbo
from adapt.model import MaskedDiffusionLM
from tiny_models import tiny_tokenizer

V = 101  # tiny tokenizer + mask token


class Stub(torch.nn.Module):
    """A model whose logits come from `fn(input_ids)`; `diffusion` decides what `adapt.evaluate` takes it for. It
    decodes with the real `diffusion_generate`, as a checkpoint does."""

    diffusion_generate = MaskedDiffusionLM.diffusion_generate

    def __init__(self, fn, diffusion=True, shift=True, mask_id=V - 1):
        super().__init__()
        self.fn = fn
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the stub a device
        self.config = SimpleNamespace(model_type="masked_diffusion_lm" if diffusion else "stub_causal",
                                      mask_token_id=mask_id if diffusion else None, shift=shift,
                                      text_config=SimpleNamespace(max_position_embeddings=64))
        self.generation_config = GenerationConfig()

    def forward(self, input_ids, attention_mask=None, logits_to_keep=None, **_):
        logits = self.fn(input_ids)
        return SimpleNamespace(logits=logits if logits_to_keep is None else logits[:, logits_to_keep])


def fixed(logp, **kw):
    """Context-free: the same distribution at every position."""
    return Stub(lambda ids: logp.expand(*ids.shape, -1).clone(), **kw)


def uniform(vocab=V, **kw):
    return fixed(torch.zeros(vocab), **kw)


def constant(token, vocab=V, **kw):
    logp = torch.full((vocab,), -10.0)
    logp[token] = 0.0
    return fixed(logp, **kw)


def words_file(path, lines=24, words=12, seed=0):
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(f"w{rng.randrange(96)}" for _ in range(words)) for _ in range(lines)) + "\n")
    return path


# ---------------------------------------------------------------------------------- ELBO golden tests

def test_uniform_logits_give_log_v_per_token_exactly(tmp_path):
    data = words_file(tmp_path / "d.txt")
    tok = tiny_tokenizer(mask_token=True)
    for k in (1, 4):
        r = adapt.evaluate(uniform(), str(data), tokenizer=tok, mc_samples=k, seq_length=16, num_sequences=8,
                           sample_by="line", batch_size=5)["elbo"]
        # every draw scores (1/l)·Σ over l masked tokens of log(V − 1) (a clean token is never [MASK], which is
        # excluded from the distribution): exactly log(V − 1) whatever l and the subset
        assert r["elbo_nats_per_token"] == pytest.approx(math.log(V - 1), abs=1e-6)
        assert r["tokens"] == 8 * 15 and (k == 1 and r["stderr"] is None or r["stderr"] < 1e-6)
    ar = adapt.evaluate(uniform(vocab=100, diffusion=False), str(data), tokenizer=tiny_tokenizer(), seq_length=16,
                        num_sequences=8, sample_by="line")["elbo"]
    assert ar["nll_nats_per_token"] == pytest.approx(math.log(100), abs=1e-6)
    assert ar["tokens"] == 8 * 15 and ar["stderr"] == 0.0 and ar["ppl"] == pytest.approx(100, rel=1e-5)


def _chain_stub(q, vocab, shift):
    """Predicts token i as f(token i−1) = token i−1 + 1 with probability q when token i−1 is visible, else
    uniform: a context-dependent model whose ELBO has a closed form."""
    mask_id = vocab - 1

    def fn(ids):  # a distribution over the vocab - 1 tokens that are not [MASK]
        logp = torch.full((*ids.shape, vocab), math.log((1 - q) / (vocab - 2)))
        rows, cols = torch.nonzero(ids != mask_id, as_tuple=True)
        logp[rows, cols, (ids[rows, cols] + 1) % vocab] = math.log(q)
        logp[ids == mask_id] = -math.log(vocab - 1)
        logp[..., mask_id] = -math.inf
        if not shift:  # the logit at i predicts token i from token i−1
            logp = torch.cat([torch.zeros_like(logp[:, :1]), logp[:, :-1]], 1)
        return logp

    return Stub(fn, shift=shift, mask_id=mask_id)


@pytest.mark.parametrize("shift", [True, False])
def test_context_dependent_elbo_matches_its_closed_form(shift):
    vocab, length, q = 40, 12, 0.7
    blocks = (torch.arange(length) + 3).repeat(96, 1)  # token i = token i−1 + 1 throughout
    r = diffusion_elbo(_chain_stub(q, vocab, shift), blocks, mc_samples=8, batch_size=64, seed=3)
    n, a = length - 1, -math.log(q)
    # token 1's left neighbour is the context token, always visible; for i ≥ 2, given i masked among l, the
    # neighbour is masked with probability (l−1)/(N−1), which averages 1/2 over l uniform on 1..N
    expected = a / n + (n - 1) / n * (a + math.log(vocab - 1)) / 2
    assert r["tokens"] == 96 * n
    assert abs(r["elbo_nats_per_token"] - expected) < 3 * r["stderr"], (r, expected)
    assert r["elbo_nats_per_token"] > a + 0.5  # looser than the left-to-right NLL a: this model is inconsistent
    # a DiffuLLaMA-style normalisation by the masked count (or a t instead of 1/t weight) lands far away
    assert r["stderr"] < 0.05


def test_stderr_shrinks_like_one_over_sqrt_k_and_the_elbo_of_an_exact_model_is_not_below_its_nll():
    vocab, length = 20, 16
    p = torch.softmax(torch.linspace(2.0, -2.0, vocab), 0)  # i.i.d. unigram data and model
    blocks = torch.multinomial(p, 64 * length, replacement=True, generator=torch.Generator().manual_seed(0))
    blocks = blocks.view(64, length)
    model = fixed(torch.cat([p.log(), torch.tensor([-30.0])]), mask_id=vocab)
    exact = -p.log()[blocks[:, 1:]].double().mean().item()
    ar = causal_nll(fixed(p.log(), diffusion=False), blocks)
    assert ar["nll_nats_per_token"] == pytest.approx(exact, abs=1e-6) and ar["tokens"] == 64 * 15
    small = diffusion_elbo(model, blocks, mc_samples=8, batch_size=128, seed=1)
    large = diffusion_elbo(model, blocks, mc_samples=32, batch_size=128, seed=2)
    ratio = small["stderr"] / large["stderr"]
    assert 1.7 < ratio < 2.3, ratio
    for r in (small, large):
        # the conditionals of an i.i.d. model are exact, so the bound is tight in expectation: it may sit
        # below the NLL only by Monte-Carlo noise
        assert r["elbo_nats_per_token"] > exact - 3 * r["stderr"], (r, exact)
        assert r["elbo_nats_per_token"] < exact + 3 * r["stderr"], (r, exact)


def test_causal_nll_of_a_known_chain_model():
    """Next token = this token + 1 with probability q: the exact NLL on chain text is −log q per token."""
    vocab, q = 40, 0.7

    def fn(ids):
        logp = torch.full((*ids.shape, vocab), math.log((1 - q) / (vocab - 1)))
        return logp.scatter(-1, ((ids + 1) % vocab)[..., None], math.log(q))

    blocks = (torch.arange(12) + 3).repeat(5, 1)
    r = causal_nll(Stub(fn, diffusion=False), blocks, batch_size=2)
    assert r["nll_nats_per_token"] == pytest.approx(-math.log(q), abs=1e-6) and r["tokens"] == 5 * 11


def test_elbo_does_not_depend_on_batch_size():
    blocks = torch.randint(3, 90, (10, 12), generator=torch.Generator().manual_seed(0))
    model = _chain_stub(0.5, V, True)
    a = diffusion_elbo(model, blocks, mc_samples=3, batch_size=1, seed=5)
    b = diffusion_elbo(model, blocks, mc_samples=3, batch_size=7, seed=5)
    assert a["elbo_nats_per_token"] == pytest.approx(b["elbo_nats_per_token"], abs=1e-6)
    assert a["elbo_nats_per_token"] != diffusion_elbo(model, blocks, mc_samples=3, seed=6)["elbo_nats_per_token"]


# --------------------------------------------------------------------------------- infill golden tests

# sample_by=line, 7 words + EOS = one block of 8 per line; span 4 starts at (8 − 4) // 2 = 2
INFILL_LINES = ["w1 w2 w9 w9 w9 w9 w3",   # 4 of 4 are w9
                "w1 w2 w9 w4 w9 w4 w3",   # 2 of 4
                "w1 w2 w5 w6 w7 w8 w3",   # 0 of 4
                "w1 w2 w9 w9 w9 w8 w3"]   # 3 of 4
W9 = 13  # tiny tokenizer: 4 specials, then w0 ...


@pytest.mark.parametrize("diffusion", [True, False])
def test_infill_accuracy_on_hand_made_cases(tmp_path, diffusion):
    data = tmp_path / "d.txt"
    data.write_text("\n".join(INFILL_LINES) + "\n")
    model = constant(W9, vocab=V if diffusion else 100, diffusion=diffusion)
    scorer = constant(W9, vocab=100, diffusion=False)
    r = adapt.evaluate(model, str(data), tokenizer=tiny_tokenizer(mask_token=diffusion), metrics="infill",
                       seq_length=8, sample_by="line", infill_span=4, ar_parent=scorer)["infill"]
    assert (r["span"], r["span_start"], r["examples"]) == (4, 2, 4)
    assert r["method"] == ("diffusion" if diffusion else "left_context_greedy")
    assert r["token_accuracy"] == pytest.approx(9 / 16) and r["span_exact_match"] == pytest.approx(1 / 4)
    # the scorer puts almost everything on w9: NLL a for a w9, b for anything else, over positions 2..7
    logp = scorer.fn(torch.zeros(1, 1, dtype=torch.long)).log_softmax(-1)[0, 0]
    a, b = -logp[W9].item(), -logp[W9 + 1].item()
    assert r["ar_parent_nll"] == pytest.approx((4 * a + 2 * b) / 6, rel=1e-5)  # filled: w9 w9 w9 w9 w3 EOS
    assert r["reference_ar_parent_nll"] == pytest.approx((9 * a + 15 * b) / 24, rel=1e-5)


def test_infill_keeps_prefix_and_suffix_and_sees_the_suffix(tmp_path):
    """A model that copies the token two places to the right can only be right if the sampler lets it see the
    suffix; a left-context model cannot."""
    data = tmp_path / "d.txt"
    data.write_text("w1 w2 w7 w8 w7 w8 w7\n" * 4)

    def from_right(ids):  # with shift, the logit at i−1 predicts token i: copy token i+2 = ids[:, (i−1)+3]
        logp = torch.full((*ids.shape, V), -10.0)
        src = torch.cat([ids[:, 3:], ids[:, -3:]], 1)
        logp.scatter_(-1, src[..., None], 0.0)
        logp[..., V - 1] = -10.0
        return logp

    r = adapt.evaluate(Stub(from_right), str(data), tokenizer=tiny_tokenizer(mask_token=True), metrics="infill",
                       seq_length=8, sample_by="line", infill_span=2)["infill"]
    # holes at positions 3, 4 (tokens w8 w7); their right neighbours at 5, 6 are w8 w7: copied exactly
    assert r["span_start"] == 3 and r["token_accuracy"] == 1.0 and r["ar_parent"] is None


# ---------------------------------------------------------------------------------------- steps sweep

def test_steps_sweep_counts_token_and_sequence_errors(tmp_path):
    length = 4
    data = words_file(tmp_path / "d.txt")
    tok = tiny_tokenizer(mask_token=True)

    def copier(ids):  # with shift, logit j predicts token j+1: copy token j+1−length, wrong for multiples of 3
        logp = torch.full((*ids.shape, V), -10.0)
        src = torch.cat([ids[:, :1].expand(-1, length - 1), ids[:, : ids.shape[1] - length + 1]], 1)
        src = torch.where(src % 3 != 0, src, src + 1)
        logp.scatter_(-1, src[..., None], 0.0)
        return logp

    r = adapt.evaluate(Stub(copier), str(data), tokenizer=tok, metrics="steps_sweep", seq_length=16,
                       sample_by="line", sweep_length=length, sweep_examples=24, seed=7,
                       ar_parent=uniform(100, diffusion=False), plot=tmp_path / "sweep.png")
    sweep = r["steps_sweep"]
    from adapt.training.data import load_documents, pack
    from adapt.config import DataConfig

    blocks = pack(load_documents(str(data), DataConfig(sample_by="line")), tok, 16, "t", max_rows=64)
    _, answers = repeat_task(blocks, tok, examples=24, length=length, seed=7, mask_id=V - 1)
    right = answers % 3 != 0
    assert [p["steps"] for p in sweep["points"]] == [1, 2, 4]
    for p in sweep["points"]:
        assert p["task_token_accuracy"] == pytest.approx(right.double().mean().item())
        assert p["task_exact_match"] == pytest.approx(right.all(1).double().mean().item())
        assert p["ar_parent_nll"] == pytest.approx(math.log(100), abs=1e-5)
    assert 0 < sweep["points"][0]["task_exact_match"] < sweep["points"][0]["task_token_accuracy"] < 1
    assert sweep["reference"]["method"] == "ar_greedy"
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_step_count_that_does_not_divide_the_length_is_that_many_passes(tmp_path):
    """--sweep-steps 3 of 4 tokens: three forward passes per prompt batch (committing 2, 1, 1), the same answers as
    any other count for a model that knows them."""
    data = words_file(tmp_path / "d.txt")
    calls = []

    def copier(ids):  # with shift, logit j predicts token j+1: copy token j+1−4
        calls.append(ids.shape)
        logp = torch.full((*ids.shape, V), -10.0)
        src = torch.cat([ids[:, :1].expand(-1, 3), ids[:, : ids.shape[1] - 3]], 1)
        return logp.scatter_(-1, src[..., None], 0.0)

    def sweep(steps):
        calls.clear()
        points = adapt.evaluate(Stub(copier), str(data), tokenizer=tiny_tokenizer(mask_token=True),
                                metrics="steps_sweep", seq_length=16, sample_by="line", sweep_length=4,
                                sweep_steps=steps, sweep_examples=8, seed=7)["steps_sweep"]["points"]
        return points, len(calls)

    (three,), passes = sweep([3])
    (one,), one_pass = sweep([1])
    assert three["steps"] == 3 and three["tokens_per_step"] == pytest.approx(4 / 3) and passes == 3 * one_pass
    assert three["task_exact_match"] == one["task_exact_match"] == 1.0


def test_infill_and_sweep_decode_with_diffusion_generate_and_its_kv_cache(converted, tmp_path):
    """Its options apply: under causal attention the prefix cache is exact (the same numbers), the dual cache
    needs bidirectional attention (refused), and a causal LM has no such option."""
    from transformers import AutoTokenizer

    _, dlm = converted("llama")
    model = MaskedDiffusionLM.from_pretrained(dlm, bidirectional=False).eval()
    tok = AutoTokenizer.from_pretrained(dlm)
    data = words_file(tmp_path / "d.txt")
    opts = dict(tokenizer=tok, metrics="infill,steps_sweep", seq_length=16, num_sequences=4, sample_by="line",
                infill_examples=4, sweep_length=4, sweep_examples=4)
    plain = adapt.evaluate(model, str(data), **opts)
    cached = adapt.evaluate(model, str(data), kv_cache="prefix", **opts)
    assert plain["infill"] == cached["infill"] and plain["steps_sweep"] == cached["steps_sweep"]
    with pytest.raises(adapt.AdaptError, match="needs bidirectional attention"):
        adapt.evaluate(model, str(data), kv_cache="dual", **opts)
    with pytest.raises(adapt.AdaptError, match="a causal LM has none"):
        adapt.evaluate(uniform(100, diffusion=False), str(data), kv_cache="prefix", **opts)


def test_repeat_task_is_deterministic_and_avoids_special_tokens():
    tok = tiny_tokenizer(mask_token=True)
    blocks = torch.tensor([[1, 2, 5, 5, 6, 7, 100, 3] * 4])
    p1, a1 = repeat_task(blocks, tok, examples=5, length=3, seed=0, mask_id=100)
    p2, a2 = repeat_task(blocks, tok, examples=5, length=3, seed=0, mask_id=100)
    assert p1.equal(p2) and a1.equal(a2)
    assert set(a1.flatten().tolist()) <= {5, 6, 7}
    assert p1[:, 0].eq(tok.bos_token_id).all() and p1[:, 1:].equal(a1.repeat(1, 2))


# --------------------------------------------------------------------------- real checkpoints and CLI

@pytest.mark.parametrize("shift", [True, False])
def test_ar_nll_and_converted_elbo_count_the_same_tokens(converted, tmp_path, shift):
    src, dlm = converted("llama")
    if not shift:
        dlm = tmp_path / "noshift"
        adapt.convert(src, dlm, shift=False)
    data = words_file(tmp_path / "d.txt")
    opts = dict(seq_length=16, num_sequences=6, sample_by="line", mc_samples=2)
    ar = adapt.evaluate(str(src), str(data), **opts)
    dm = adapt.evaluate(str(dlm), str(data), **opts)
    assert ar["kind"] == "causal" and dm["kind"] == "diffusion"
    assert ar["elbo"]["tokens"] == dm["elbo"]["tokens"] == 6 * 15 and ar["sequences"] == dm["sequences"] == 6
    # the keys' old names (block_length, blocks), written beside the new ones until 0.7.0, are gone
    for r in (ar, dm):
        assert (r["sequences"], r["seq_length"], r["elbo"]["sequences"]) == (6, 16, 6)
        assert not {"block_length", "blocks"} & (r.keys() | r["elbo"].keys())
    assert set(ar["elbo"]) >= {"nll_nats_per_token", "ppl", "stderr", "tokens"}
    assert set(dm["elbo"]) >= {"elbo_nats_per_token", "ppl_bound", "stderr", "tokens"}
    # a random tiny model: both near log V, so a wrong token count or unit would show as a large gap
    assert abs(ar["elbo"]["nll_nats_per_token"] - math.log(100)) < 0.3
    assert abs(dm["elbo"]["elbo_nats_per_token"] - math.log(101)) < 0.3


def test_jsonl_and_txt_give_the_same_blocks(converted, tmp_path):
    src, _ = converted("llama")
    txt = words_file(tmp_path / "d.txt")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": line}) + "\n" for line in txt.read_text().splitlines()))
    a = adapt.evaluate(str(src), str(txt), seq_length=16, num_sequences=4, sample_by="line")
    b = adapt.evaluate(str(src), str(jsonl), seq_length=16, num_sequences=4)
    assert a["elbo"] == b["elbo"]


def test_a_separator_packs_the_scored_text_as_training_packed_it(converted, tmp_path):
    """--separator reaches the packing: naming the tokenizer's own EOS scores what the default does (this tokenizer
    puts EOS after each document), another token scores other sequences."""
    _, dlm = converted("llama")
    txt = words_file(tmp_path / "d.txt")
    kw = dict(seq_length=16, num_sequences=4, sample_by="line", mc_samples=2)
    default = adapt.evaluate(str(dlm), str(txt), **kw)["elbo"]
    assert adapt.evaluate(str(dlm), str(txt), separator="</s>", **kw)["elbo"] == default
    assert adapt.evaluate(str(dlm), str(txt), separator="<pad>", **kw)["elbo"] != default


def test_cli_writes_json_and_plot(converted, tmp_path, capsys):
    _, dlm = converted("llama")
    data = words_file(tmp_path / "d.txt")
    out, png = tmp_path / "r" / "eval.json", tmp_path / "r" / "sweep.png"
    code = main(["eval", str(dlm), "--data", str(data), "--metrics", "elbo,infill,steps_sweep", "--mc-samples", "2",
                 "--seq-length", "16", "--num-sequences", "4", "--sample-by", "line", "--infill-examples", "4",
                 "--sweep-length", "4", "--sweep-steps", "1,4", "--sweep-examples", "4", "--json", str(out),
                 "--plot", str(png)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert {"elbo_nats_per_token", "ppl_bound", "stderr", "tokens"} <= set(result["elbo"])
    assert {"token_accuracy", "ar_parent_nll", "span"} <= set(result["infill"])
    assert result["infill"]["ar_parent"] and result["infill"]["ar_parent_nll"] > 0  # parent from provenance
    assert [p["steps"] for p in result["steps_sweep"]["points"]] == [1, 4]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _neither(tmp_path):
    d = tmp_path / "neither"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "vit"}))
    return d


BAD = {
    "missing data file": (lambda tmp, dlm, data: [str(dlm), "--data", str(tmp / "nope.txt")], "data file .* not found"),
    "unknown metric": (lambda tmp, dlm, data: [str(dlm), "--data", str(data), "--metrics", "elbo,bleu"],
                       "unknown metric bleu"),
    "neither model": (lambda tmp, dlm, data: [str(_neither(tmp)), "--data", str(data)],
                      "neither a dlm-adapt diffusion checkpoint nor a causal LM"),
    "dir without config": (lambda tmp, dlm, data: [str(tmp), "--data", str(data)], "has no config.json"),
    "missing model": (lambda tmp, dlm, data: [str(tmp / "no" / "model"), "--data", str(data)], "not found"),
    "plot without sweep": (lambda tmp, dlm, data: [str(dlm), "--data", str(data), "--plot", str(tmp / "p.png")],
                           "add steps_sweep"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_clear_error(converted, tmp_path, capsys, case):
    _, dlm = converted("llama")
    data = words_file(tmp_path / "d.txt")
    make, message = BAD[case]
    code = main(["eval", *make(tmp_path, dlm, data)])
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert code == 2 and len(err) == 1 and err[0].startswith("dlm-adapt: error: "), stderr
    assert "Traceback" not in stderr and re.search(message, err[0]), err[0]


def test_old_names_of_seq_length_and_num_sequences_are_unknown_flags(monkeypatch, capsys):
    """--block-length (removed in 0.6.0) and --num-blocks (0.7.0) fail as any unknown flag does: one line."""
    import importlib

    evaluate_module = importlib.import_module("adapt.evaluation.harness")
    seen = {}
    monkeypatch.setattr(evaluate_module, "evaluate", lambda model, data, **kw: seen.update(kw) or {"ok": 1})
    assert main(["eval", "m", "--data", "d.txt"]) == 0 and (seen["seq_length"], seen["num_sequences"]) == (128, 64)
    capsys.readouterr()
    for flag, value in (("--block-length", "32"), ("--num-blocks", "8")):
        seen.clear()
        assert main(["eval", "m", "--data", "d.txt", flag, value]) == 2
        err = capsys.readouterr().err
        assert err == f"dlm-adapt: error: unrecognized arguments: {flag} {value}; see dlm-adapt --help\n", err
        assert not seen
    assert main(["eval", "m", "--data", "d.txt", "--num-sequences", "8"]) == 0 and seen["num_sequences"] == 8


def test_evaluate_num_blocks_keyword_is_gone(tmp_path):
    """num_blocks= (num_sequences= before 0.7.0) is an unknown keyword, refused before anything loads."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_blocks'"):
        adapt.evaluate(str(tmp_path / "no-such-model"), str(tmp_path / "d.txt"), num_blocks=4)
