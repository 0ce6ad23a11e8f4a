"""Keeping the parent's knowledge (issue 26): the clean stream as an exact AR mode, the AR loss, position-dependent
masking with its ELBO weighting, distillation from the frozen parent, and the options off reproducing the losses
training had before them."""

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

import adapt
from adapt import AdaptError
from adapt.config import load_config
from adapt.config.diffusion import ObjectiveConfig
from adapt.model.block_masked_diffusion import cached_block_mask, two_l_logits
from adapt.model.transformers_compat import full_cache
from adapt.training.distill import kl_divergence
from adapt.training.objective import noised_batch, position_exponents, position_schedule
from adapt.training.retention import ar_loss, clean_left
from tiny_models import ARCHS, save_tiny_source, write_word_runs

B = 4


@pytest.fixture(scope="module")
def block_4(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"{arch}-b4")
            save_tiny_source(root / "src", arch)
            adapt.convert(root / "src", root / "dlm", block_size=B)
            cache[arch] = root / "src", root / "dlm"
        return cache[arch]

    return get


def _ids(batch=2, length=12, seed=0):
    return torch.randint(6, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_causal_clean_stream_is_the_ar_parent_at_step_0(block_4, arch):
    src, out = block_4(arch)
    causal = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    model, _ = adapt.load(out, attn_implementation="eager")
    x = _ids()
    noisy = x.masked_fill(torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.5,
                          model.config.mask_token_id)
    with torch.no_grad():
        ref = causal(x).logits
        _, block_clean = two_l_logits(model, noisy, x, clean_logits=True)
        model.config.clean_attention = "causal"
        canvas, clean = two_l_logits(model, noisy, x, clean_logits=True)
    torch.testing.assert_close(clean[..., : ref.shape[-1]], ref, atol=1e-5, rtol=0)
    # the default (block-wise) clean stream sees later tokens of its block: not the parent
    assert (block_clean[..., : ref.shape[-1]] - ref).abs().max() > 1e-3
    # block starts are read from the clean stream (shift): the parent's prediction exactly
    ends = torch.arange(x.shape[1]) % B == B - 1
    torch.testing.assert_close(canvas[:, ends, : ref.shape[-1]], ref[:, ends], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_block_decoding_cache_sees_what_the_causal_clean_stream_sees(block_4, arch):
    """A cached forward (finished blocks + the block being denoised) gives the 2L layout's logits for that block."""
    _, out = block_4(arch)
    model, _ = adapt.load(out, attn_implementation="eager")
    model.config.clean_attention = "causal"
    x = _ids(batch=1)
    noisy = x.masked_fill(torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) < 0.6,
                          model.config.mask_token_id)
    with torch.no_grad():
        two_l = two_l_logits(model, noisy, x)
        for b in (1, 2):
            lo, hi = b * B, (b + 1) * B
            canvas = torch.cat([x[:, :lo], noisy[:, lo:hi]], 1)
            logits = model(input_ids=canvas, attention_mask=torch.ones_like(canvas), past_key_values=full_cache(),
                           use_cache=True).logits
            torch.testing.assert_close(logits[:, lo:hi - 1], two_l[:, lo:hi - 1], atol=1e-5, rtol=0)


def test_cached_mask_clean_queries_are_token_causal():
    from tiny_models import tiny_config

    config = tiny_config("llama")
    config._attn_implementation = "sdpa"
    padding = torch.ones(1, 8, dtype=torch.long)
    seen = cached_block_mask(config, padding, torch.arange(8)[None], 4, torch.float32, "causal")[0, 0]
    assert not seen[1, 2] and seen[2, 1]  # a finished block: token-causal
    assert seen[4, 7] and seen[7, 4] and seen[4, 3] and not seen[3, 4]  # the block being denoised: both ways
    block = cached_block_mask(config, padding, torch.arange(8)[None], 4, torch.float32)[0, 0]
    assert block[1, 2]


def test_ar_loss_at_step_0_is_the_parents_nll(block_4):
    src, out = block_4("llama")
    causal = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    model, _ = adapt.load(out, attn_implementation="eager")
    model.config.clean_attention = "causal"
    x = _ids()
    with torch.no_grad():
        _, clean = two_l_logits(model, x, x, clean_logits=True)
        got = ar_loss(clean, x, torch.ones_like(x, dtype=torch.bool), model.config.mask_token_id)
        logits = causal(x).logits[:, :-1]
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())  # [MASK] is new: p ~ 0
    assert abs(float(got) - float(want)) < 1e-4


def test_clean_left_marks_masked_tokens_with_nothing_masked_before_in_their_block():
    masked = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1, 0, 1]], dtype=torch.bool)
    assert clean_left(masked, 4).long().tolist() == [[0, 1, 0, 0, 1, 0, 0, 0, 0, 1]]
    assert clean_left(masked, None).long().tolist() == [[0, 1, 0, 0, 0, 0, 0, 0, 0, 0]]


def test_position_masking_weighting_is_an_unbiased_bound_closed_form():
    """Two-token block, a toy model whose cross-entropy at j is a_j when the other token is masked, b_j when it is
    clean. Under p_j(t) = t^γ_j with weight γ_j/t the expected loss is Σ_j b_j + (a_j − b_j)·γ_j/(γ_j + γ_k)
    (∫ γ_j t^(γ_j−1) t^γ_k dt); for a model that ignores context (a = b) it is Σ b_j, its exact NLL, for every
    strength. The complement mask (1 − t^γ_j, weighted by its own schedule) is the same kind of bound with the
    preference reversed: Σ_j b_j + (a_j − b_j)·γ_k/(γ_j + γ_k)."""
    a, b = torch.tensor([3.0, 2.0]), torch.tensor([1.0, 0.5])
    n = 400_000
    for c, complementary in ((1.5, False), (1.5, True), (0.0, False)):
        cfg = ObjectiveConfig(position_masking=c, complementary=complementary, eps=1e-6)
        x0 = torch.zeros(n, 2, dtype=torch.long)
        g = torch.Generator().manual_seed(0)
        _, _, masked, _, t = noised_batch(x0, torch.ones_like(x0, dtype=torch.bool), cfg, 9, shift=False,
                                          generator=g, block_size=2)
        other = masked.flip(1)
        ce = torch.where(other, a, b)
        per_row = (ce * masked / t).sum(1)
        gamma = position_exponents(2, 2, c)
        share = gamma / (gamma + gamma.flip(0))
        want = float((b + (a - b) * share).sum())
        if complementary:
            want = (want + float((b + (a - b) * (1 - share)).sum())) / 2
            per_row = per_row.view(2, n).mean(0)
        sem = float(per_row.std()) / n ** 0.5
        assert abs(float(per_row.mean()) - want) < 5 * sem, (c, complementary, float(per_row.mean()), want)
    assert position_exponents(4, 4, 1.0)[0] > 1 > position_exponents(4, 4, 1.0)[3]  # later positions: more masked
    p, weight_t = position_schedule(torch.tensor([0.3]), torch.tensor([1.0]))
    assert float(p) == pytest.approx(0.3) and float(weight_t) == pytest.approx(0.3)


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("retention")
    save_tiny_source(root / "src", "llama")
    write_word_runs(root / "train.txt", 100)
    return root


def _train(root, out, *extra):
    cfg = load_config(None, [f"output_dir={out}", f"model.path={root / 'src'}", f"data.train={root / 'train.txt'}",
                             "data.seq_length=16", "data.max_eval_sequences=4", "train.batch_size=4", "max_steps=3",
                             "eval_steps=0", "save_steps=0", "sample_steps=0", "model.attn_implementation=eager",
                             *extra])
    final = adapt.train(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], final


# Recorded with the code before these options existed (commit 54738db), same tiny source, data and settings.
BEFORE = {"block": [7.890932559967041, 8.064629554748535, 8.218489646911621],
          "full": [10.814033508300781, 5.605465888977051, 15.652115821838379]}


@pytest.mark.parametrize("mode,extra", [
    ("block", ["block.size=4", "anneal.mode=none", "objective.complementary=true"]),
    ("full", ["anneal.anneal_steps=2"])])
def test_options_off_reproduce_the_losses_before_them(run_setup, tmp_path, mode, extra):
    off = ["objective.ar_loss_weight=0", "objective.position_masking=0", "objective.distill_weight=0"]
    records, _ = _train(run_setup, tmp_path / mode, *extra, *off)
    assert [r["loss"] for r in records] == pytest.approx(BEFORE[mode], rel=1e-6, abs=0)


def test_ar_and_distill_terms_are_logged_and_the_checkpoint_keeps_causal_clean_attention(run_setup, tmp_path):
    records, final = _train(run_setup, tmp_path / "run", "block.size=4", "anneal.mode=none",
                            "block.clean_attention=causal", "objective.ar_loss_weight=0.5",
                            "objective.position_masking=1", "objective.distill_weight=0.5", "eval_steps=3")
    assert all({"ar_loss", "distill_kl"} <= r.keys() for r in records)
    # validation reports what the model kept of its parent
    assert {"val_elbo", "val_block_start_nll", "val_ar_nll", "val_masked_per_block"} <= records[2].keys()
    within = records[2]["val_within_documents"]  # and the same without the packing's separators
    assert set(within) == {"block_start_nll", "ar_nll", "ar_block_start_nll"}
    assert within["ar_nll"] != pytest.approx(records[2]["val_ar_nll"], rel=1e-4)
    # step 1, before any update: the clean stream is the parent, so the AR term is the parent's NLL (> 0) and the
    # distillation term a KL (>= 0)
    assert records[0]["ar_loss"] > 0 and records[0]["distill_kl"] >= 0
    assert json.loads((final / "config.json").read_text())["clean_attention"] == "causal"


def test_a_run_with_the_parent_as_the_ar_target_logs_the_kl_in_place_of_the_cross_entropy(run_setup, tmp_path):
    records, _ = _train(run_setup, tmp_path / "run", "block.size=4", "anneal.mode=none",
                        "block.clean_attention=causal", "objective.ar_loss_weight=0.5", "objective.ar_target=parent")
    assert all("ar_kl" in r and "ar_loss" not in r and math.isfinite(r["ar_kl"]) for r in records)
    # step 1 is the parent but for packed documents, which the clean stream keeps apart: a small KL, not 0
    assert 0 <= records[0]["ar_kl"] < 0.1 < records[0]["loss"]


@pytest.mark.parametrize("mode", ["block", "full"])
def test_distillation_at_step_0_with_an_untrained_adapter_is_the_closed_form_kl(block_4, converted, mode):
    """LoRA (B = 0: the adapter changes nothing yet): the term equals KL(parent ‖ model) computed from the causal
    parent's and the model's distributions (block: the 2L layout's; full-sequence: the bidirectional forward's),
    over masked tokens with clean left context (block: in their block; full-sequence: in the whole row)."""
    from peft import LoraConfig, get_peft_model

    from adapt.training.retention import Retention

    size = B if mode == "block" else None
    src, out = block_4("llama") if mode == "block" else converted("llama")
    causal = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    model, _ = adapt.load(out, attn_implementation="eager")
    mask_id = model.config.mask_token_id
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    x = _ids(batch=2 if size else 4, length=12)  # full-sequence: one token per row has a clean left context
    masked = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) < 0.5
    masked[:, 0] = False
    noisy = x.masked_fill(masked, mask_id)

    class FakeRecipe:  # what Retention reads from a run
        class cfg:
            objective = ObjectiveConfig(distill_weight=1.0)
            train = type("T", (), {"method": "lora"})
            block = type("Blk", (), {"clean_attention": None, "size": size, "noise": "block"})
        dlm, checkpoint_block, world, block = model, size, 1, size
        accelerator = type("A", (), {"unwrap_model": staticmethod(lambda m: m)})

    recipe = FakeRecipe()
    recipe.model = peft
    retention = Retention(recipe)
    with torch.no_grad():
        student = two_l_logits(model, noisy, x) if size else model(input_ids=noisy).logits
        total, terms = retention.loss(recipe, student, None, x, masked, torch.ones_like(masked), torch.ones_like(x))
        parent = causal(x).logits
    p = parent[:, :-1].double().log_softmax(-1)
    s = student[:, :-1, : parent.shape[-1]].double()  # [MASK] removed: renormalised over the parent's vocabulary
    q = s.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    valid = clean_left(masked, size)[:, 1:]
    want = float(kl[valid].mean())
    # float32 log-softmax against float64: agreement to ~1e-7 nats on a KL of ~4e-4 (a near-uniform tiny model)
    assert valid.sum() >= 3 and want > 1e-4
    assert terms["distill_kl"] == pytest.approx(want, abs=1e-6) and float(total) == pytest.approx(want, abs=1e-6)
    assert float(kl_divergence(parent[:, :-1], parent[:, :-1]).abs().max()) < 1e-5


def test_ar_term_with_the_parent_as_target_is_the_closed_form_kl(block_4):
    """`ar_target: parent`: the AR term is KL(parent ‖ clean stream) at every position, the next-token
    distributions at i − 1 ([MASK] removed); 0 where the clean stream is the parent (step 0), the closed form
    where it is not."""
    from peft import LoraConfig, get_peft_model

    from adapt.training.retention import Retention

    src, out = block_4("llama")
    causal = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    model, _ = adapt.load(out, attn_implementation="eager")
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    class FakeRecipe:
        class cfg:
            objective = ObjectiveConfig(ar_loss_weight=1.0, ar_target="parent")
            train = type("T", (), {"method": "lora"})
            block = type("Blk", (), {"clean_attention": "causal", "size": B, "noise": "block"})
        dlm, checkpoint_block, world, block = model, B, 1, B
        accelerator = type("A", (), {"unwrap_model": staticmethod(lambda m: m)})

    recipe = FakeRecipe()
    recipe.model = peft
    retention = Retention(recipe)
    x = _ids(batch=2, length=12)
    ones, none_masked = torch.ones_like(x), torch.zeros(x.shape, dtype=torch.bool)
    with torch.no_grad():
        parent = causal(x).logits
        clean = model(input_ids=x, is_causal=True).logits  # the clean stream at step 0
        _, same = retention.loss(recipe, clean, clean, x, none_masked, ones.bool(), ones)
        moved = clean + torch.randn(clean.shape, generator=torch.Generator().manual_seed(3))
        total, terms = retention.loss(recipe, moved, moved, x, none_masked, ones.bool(), ones)
    assert set(same) == {"ar_kl"} and same["ar_kl"] == pytest.approx(0, abs=1e-6)
    p = parent[:, :-1].double().log_softmax(-1)
    q = moved[:, :-1, : parent.shape[-1]].double().log_softmax(-1)
    want = float((p.exp() * (p - q)).sum(-1).mean())
    assert want > 0.1 and terms["ar_kl"] == pytest.approx(want, rel=1e-5) and float(total) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("overrides,message", [
    (["objective.ar_loss_weight=1", "block.size=4", "anneal.mode=none"], "block.clean_attention=causal"),
    (["objective.ar_target=parent", "block.size=4", "anneal.mode=none", "block.clean_attention=causal"],
     "ar_loss_weight above 0"),
    (["objective.position_masking=1"], "needs block diffusion"),
    (["objective.position_masking=1", "block.size=4", "anneal.mode=none", "objective.complementary=true"],
     "complementary"),
    (["block.clean_attention=causal"], "block.size"),
])
def test_options_that_cannot_apply_are_one_clear_error(run_setup, tmp_path, overrides, message):
    with pytest.raises(AdaptError, match=message):
        _train(run_setup, tmp_path / "bad", *overrides)


def test_eval_forgetting_metrics_against_the_parent(block_4, tmp_path):
    """`dlm-adapt eval --metrics forgetting`: at step 0 a causal clean stream predicts block starts exactly as the
    parent does (change 0) and its AR mode is the parent; the block-wise clean stream does not."""
    src, out = block_4("llama")
    data = tmp_path / "valid.txt"
    rng = random.Random(1)
    data.write_text("\n\n".join(" ".join(f"w{rng.randrange(4, 90)}" for _ in range(40)) for _ in range(8)))
    common = dict(metrics="forgetting", ar_parent=str(src), seq_length=16, num_sequences=4, batch_size=2)
    block = adapt.evaluate(out, str(data), **common)["forgetting"]
    assert block["parent"] == str(src) and set(block["masked_per_block"]) == {"1", "2", "3", "4"}
    assert block["ar_nll"] == pytest.approx(block["parent_nll"], abs=1e-5)  # is_causal: the parent exactly
    assert abs(block["block_start_change"]) > 1e-4 and block["block_start_tokens"] == 4 * 3
    model, tok = adapt.load(out)
    model.config.clean_attention = "causal"
    causal = adapt.evaluate(model, str(data), tokenizer=tok, **common)["forgetting"]
    assert causal["clean_attention"] == "causal" and abs(causal["block_start_change"]) < 1e-5
    with pytest.raises(AdaptError, match="no blocks"):
        adapt.evaluate(src, str(data), **common)


def test_forgetting_within_documents_leaves_out_each_separator_and_the_token_after(block_4, tmp_path):
    """`within_documents`: the parent's NLL over exactly the targets that are neither the packing's separator nor
    the token right after one, recomputed here from the parent's logits; a causal clean stream still matches the
    parent there at step 0."""
    from adapt.training.data import document_separator, pack

    src, out = block_4("llama")
    data = tmp_path / "valid.txt"
    rng = random.Random(2)
    data.write_text("\n\n".join(" ".join(f"w{rng.randrange(4, 90)}" for _ in range(rng.randrange(3, 9)))
                                for _ in range(30)))  # short documents: several separators per row
    model, tok = adapt.load(out)
    model.config.clean_attention = "causal"
    common = dict(metrics="forgetting", ar_parent=str(src), seq_length=16, num_sequences=4, batch_size=2)
    result = adapt.evaluate(model, str(data), tokenizer=tok, **common)["forgetting"]
    within = result["within_documents"]
    sep = document_separator(tok)[1]
    x = pack(adapt.training.data.load_documents(str(data), adapt.config.DataConfig()), tok, 16, "evaluation",
             max_rows=4)
    keep = (x[:, 1:] != sep) & (x[:, :-1] != sep)
    assert within["separator_id"] == sep and 0 < within["tokens"] == int(keep.sum()) < x[:, 1:].numel()
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(src)(x).logits[:, :-1].double()
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none").view_as(keep)
    assert within["parent_nll"] == pytest.approx(float(ce[keep].mean()), rel=1e-5)
    assert result["parent_nll"] == pytest.approx(float(ce.mean()), rel=1e-5)
    assert within["parent_nll"] != pytest.approx(result["parent_nll"], rel=1e-4)
    starts = keep & (torch.arange(1, 16) % 4 == 0)
    assert within["block_start_tokens"] == int(starts.sum())
    assert within["parent_block_start_nll"] == pytest.approx(float(ce[starts].mean()), rel=1e-5)
    assert abs(within["block_start_change"]) < 1e-5 and within["ar_nll"] == pytest.approx(within["parent_nll"], abs=1e-5)
    # the block-wise clean stream differs from the parent: the paired standard error of the change, per block start
    model.config.clean_attention = "block"
    within = adapt.evaluate(model, str(data), tokenizer=tok, **common)["forgetting"]["within_documents"]
    with torch.no_grad():
        block = two_l_logits(model, torch.full_like(x, model.config.mask_token_id), x, block_size=B)[:, :-1].double()
    block[..., model.config.mask_token_id] = -torch.inf
    own = torch.nn.functional.cross_entropy(block.flatten(0, 1), x[:, 1:].flatten(), reduction="none").view_as(keep)
    d = (own - ce)[starts]
    assert within["block_start_change"] == pytest.approx(float(d.mean()), rel=1e-4, abs=1e-6)
    assert within["block_start_change_stderr"] == pytest.approx(float(d.std() / len(d) ** 0.5), rel=1e-4)


def test_within_documents_on_hand_built_rows_and_a_selection_without_block_starts(block_4):
    """The kept targets written out by hand (SEP = 50 at positions 3 and 8: targets 3, 4, 8, 9 leave, among them the
    block starts 4 and 8), and a row whose every block start is a separator or follows one: NaN, never 0."""
    from adapt.training.forgetting import forgetting

    src, out = block_4("llama")
    model, _ = adapt.load(out)
    parent = AutoModelForCausalLM.from_pretrained(src).eval()
    x = torch.tensor([[5, 6, 7, 50, 9, 10, 11, 12, 50, 14, 15, 16, 17]])
    within = forgetting(model, x, parent=parent, separator=50)["within_documents"]
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(parent(x).logits[0, :-1].double(), x[0, 1:], reduction="none")
    kept = [1, 2, 5, 6, 7, 10, 11, 12]  # target positions
    assert within["tokens"] == len(kept) and within["block_start_tokens"] == 1  # target 12 alone
    assert within["parent_nll"] == pytest.approx(float(ce[[t - 1 for t in kept]].mean()), rel=1e-6)
    assert within["parent_block_start_nll"] == pytest.approx(float(ce[11]), rel=1e-6)
    none = forgetting(model, torch.tensor([[5, 6, 7, 50, 9, 10, 11, 50, 13]]), parent=parent, separator=50)
    assert none["block_start_tokens"] == 2 and none["within_documents"]["block_start_tokens"] == 0
    assert math.isnan(none["within_documents"]["block_start_change"])
    assert math.isnan(none["within_documents"]["block_start_nll"]) and none["within_documents"]["tokens"] == 4


def test_within_documents_rule_counts_a_separator_at_row_start():
    """The one rule `forgetting` and benchmarks/separator_cost.py share: target i + 1 leaves when it is the separator
    or when input token i is, token 0 included (a row packed to start with BOS)."""
    from adapt.training.forgetting import within_documents

    x = torch.tensor([[1, 5, 6, 1, 7, 8], [5, 6, 7, 8, 9, 1]])
    assert within_documents(x, 1).tolist() == [[False, True, False, False, True],
                                              [True, True, True, True, False]]
