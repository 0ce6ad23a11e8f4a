"""SFT: answer spans, prompt never noised, EOS padding switch, no cross-sample attention, recipes, bad inputs."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adapt
from adapt import AdaptError, SFTConfig, load_config
from adapt.config import SFTDataConfig
from adapt.training.objective import ObjectiveConfig, noised_batch
from adapt.training.batch import Batch
from adapt.training.sft_data import build_sft_datasets, encode, tokenize_conversation
from adapt.training.likelihood import diffusion_elbo
from conftest import require_shared
from tiny_models import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# a template in the tiny tokenizer's vocabulary: w2 opens a user turn, w1 an assistant turn, w3 a system turn
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}w1 {{ m['content'] }} {{ eos_token }} "
            "{% elif m['role'] == 'system' %}w3 {{ m['content'] }} {% else %}w2 {{ m['content'] }} {% endif %}"
            "{% endfor %}{% if add_generation_prompt %}w1 {% endif %}")
CONVERSATION = [{"role": "system", "content": "w60"},
                {"role": "user", "content": "w10 w11"}, {"role": "assistant", "content": "w20 w21 w22"},
                {"role": "user", "content": "w12"}, {"role": "assistant", "content": "w23"}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_answer_spans_are_exactly_the_assistant_tokens(tok):
    ids, trained = tokenize_conversation(CONVERSATION, tok, TEMPLATE, "all_assistant")
    assert ids == ids_of(tok, "w3 w60 w2 w10 w11 w1 w20 w21 w22 </s> w2 w12 w1 w23 </s>")
    answers = [tok.convert_ids_to_tokens(i) for i, t in zip(ids, trained) if t]
    assert answers == ["w20", "w21", "w22", "</s>", "w23", "</s>"]
    # the prompt before each answer is exactly what generation renders (add_generation_prompt=True)
    first = trained.index(True)
    assert ids[:first] == ids_of(tok, tok.apply_chat_template(CONVERSATION[:2], chat_template=TEMPLATE,
                                                              tokenize=False, add_generation_prompt=True))

    ids_last, trained_last = tokenize_conversation(CONVERSATION, tok, TEMPLATE, "last_assistant")
    assert ids_last == ids
    assert [tok.convert_ids_to_tokens(i) for i, t in zip(ids, trained_last) if t] == ["w23", "</s>"]


def test_turns_after_the_last_answer_are_dropped(tok):
    ids, trained = tokenize_conversation(CONVERSATION[:3] + [{"role": "user", "content": "w30"}], tok, TEMPLATE,
                                         "all_assistant")
    assert ids == ids_of(tok, "w3 w60 w2 w10 w11 w1 w20 w21 w22 </s>") and trained[-1]


def test_the_three_formats_give_the_same_sample(tok, tmp_path):
    rows = {"messages": {"messages": CONVERSATION[1:3]},
            "prompt_completion": {"prompt": "w10 w11", "completion": "w20 w21 w22"},
            "instruction": {"instruction": "w10", "input": "w11", "output": "w20 w21 w22"}}
    cfg = SFTDataConfig(chat_template=TEMPLATE, max_length=12)
    tensors = {}
    for fmt, row in rows.items():
        tensors[fmt] = encode([row], fmt, tok, TEMPLATE, cfg, "training")
    torch.testing.assert_close(vars(tensors["messages"]), vars(tensors["prompt_completion"]))
    # instruction + input are joined by a blank line, which the whitespace tokenizer drops
    torch.testing.assert_close(vars(tensors["messages"]), vars(tensors["instruction"]))


@pytest.mark.parametrize("mode", ["trained", "clean", "none"])
def test_eos_padding_obeys_the_switch(tok, mode):
    cfg = SFTDataConfig(chat_template=TEMPLATE, max_length=20, eos_padding=mode)
    sample = encode([{"messages": CONVERSATION[1:3]}], "messages", tok, TEMPLATE, cfg, "training")[0]
    real = len(ids_of(tok, "w2 w10 w11 w1 w20 w21 w22 </s>"))
    ids, maskable, attention = sample.input_ids[0], sample.maskable[0], sample.attention_mask[0]
    assert maskable[:real].tolist() == [0] * 4 + [1] * 4
    if mode == "none":
        assert attention[real:].sum() == 0 and maskable[real:].sum() == 0
    else:
        assert (ids[real:] == tok.eos_token_id).all() and (attention[real:] == 1).all()
        assert (maskable[real:] == (mode == "trained")).all()


def test_prompt_positions_are_never_masked_over_many_draws(tok):
    cfg = SFTDataConfig(chat_template=TEMPLATE, max_length=24)
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}, {"prompt": "w5", "completion": "w6"}]
    formats = ["messages", "messages", "prompt_completion"]
    x0, maskable, _ = Batch.cat([encode([r], f, tok, TEMPLATE, cfg, "training")
                                 for r, f in zip(rows, formats)]).split()
    g = torch.Generator().manual_seed(0)
    ever_masked = torch.zeros_like(maskable)
    for _ in range(300):
        x_t, _, masked, _, _ = noised_batch(x0, maskable, ObjectiveConfig(), 99, True, g)
        assert not (masked & ~maskable).any()
        assert (x_t[~maskable] == x0[~maskable]).all()  # the prompt and padding are untouched
        ever_masked |= masked
    expected = maskable.clone()
    expected[:, 0] = False  # under shift nothing predicts position 0
    assert (ever_masked == expected).all()  # and every answer position does get noised


def test_one_sample_cannot_change_another_samples_logits(converted, tok):
    model, _ = adapt.load(converted("llama")[1])
    cfg = SFTDataConfig(chat_template=TEMPLATE, max_length=16, eos_padding="none")
    batch = encode([{"prompt": "w10 w11", "completion": "w20 w21"}, {"prompt": "w12", "completion": "w22 w23 w24"}],
                   "prompt_completion", tok, TEMPLATE, cfg, "training")
    x0, _, padding = batch.split()
    other = x0.clone()
    other[1, :3] = torch.tensor(ids_of(tok, "w40 w41 w42"))
    with torch.no_grad():
        a, b = model(x0, attention_mask=padding).logits, model(other, attention_mask=padding).logits
    real = padding[0].bool()
    torch.testing.assert_close(a[0, real], b[0, real], atol=0, rtol=0)
    assert not torch.allclose(a[1], b[1])
    # the property is not vacuous: packing both samples into one row would let the second change the first
    row = torch.cat([x0[0, real], x0[1]])[None]
    row_other = torch.cat([x0[0, real], other[1]])[None]
    with torch.no_grad():
        packed = model(row).logits[0, : int(real.sum())] - model(row_other).logits[0, : int(real.sum())]
    assert packed.abs().max() > 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory, converted):
    root = tmp_path_factory.mktemp("sft")
    source, dlm = converted("llama")  # copies: this module rewrites the tokenizer, other modules share the fixture
    shutil.copytree(source, root / "causal")
    shutil.copytree(dlm, root / "dlm")
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(root / "dlm")  # a tokenizer that has a chat template of its own
    import random

    rng = random.Random(0)
    with open(root / "chat.jsonl", "w") as f:  # the answer repeats the prompt's words: learnable in a few steps
        for _ in range(200):
            words = [f"w{rng.randrange(10, 90)}" for _ in range(rng.randrange(2, 5))]
            f.write(json.dumps({"messages": [{"role": "user", "content": " ".join(words)},
                                             {"role": "assistant", "content": " ".join(words)}]}) + "\n")
    return root


def _sft_cfg(setup, out, *overrides):
    base = [f"output_dir={out}", f"model.path={setup / 'dlm'}", f"data.train={setup / 'chat.jsonl'}",
            "data.max_length=16", "train.batch_size=8", "train.lr=3e-3", "max_steps=40", "eval_steps=40",
            "save_steps=0", "model.attn_implementation=eager"]
    return load_config(None, base + list(overrides), cls=SFTConfig)


def test_tiny_sft_run_lowers_the_response_elbo_and_keeps_the_chat_template(setup, tmp_path):
    cfg = _sft_cfg(setup, tmp_path / "run", "sample_steps=20")
    model, tok = adapt.load(setup / "dlm")
    _, val, _ = build_sft_datasets(cfg.data, tok, None, cfg.train.seed)
    before = diffusion_elbo(model, val, mc_samples=4, seed=0)["elbo_nats_per_token"]
    final = adapt.sft(cfg)
    trained, trained_tok = adapt.load(final)
    after = diffusion_elbo(trained, val, mc_samples=4, seed=0)["elbo_nats_per_token"]
    assert after < 0.7 * before, (before, after)
    assert trained_tok.chat_template == TEMPLATE
    assert (tmp_path / "run" / "samples.log").read_text().count("--- step") == 2


@pytest.mark.slow
def test_causal_source_and_default_template_through_the_cli(setup, tmp_path):
    out = tmp_path / "run"
    chat = tmp_path / "pc.jsonl"
    chat.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1}", "completion": f"w{i + 2}"}) + "\n"
                            for i in range(10, 60)))
    proc = subprocess.run([sys.executable, "-m", "adapt", "sft", str(ROOT / "recipes/sft/stories260k-tiny.yaml"),
                           f"output_dir={out}", f"model.path={setup / 'causal'}", f"data.train={chat}",
                           "data.max_length=48", "max_steps=2", "eval_steps=0", "sample_steps=0",
                           "anneal.anneal_steps=2", "train.batch_size=4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, tok = adapt.load(out / "final")
    assert "### Assistant:" in tok.chat_template  # the default template travels with the checkpoint


BAD = {
    "no expected columns": ({"text": "w1 w2"}, [], "SFT needs a 'messages' column"),
    "no assistant turn": ({"messages": [{"role": "user", "content": "w1"}]}, [], "training sample 0: .*no assistant"),
    "no chat template": ({"prompt": "w1", "completion": "w2"}, ["model.path={causal}"], "no chat template; set "
                         "data.chat_template=default"),
    "too long": ({"prompt": " ".join(["w5"] * 20), "completion": "w6"}, [], "samples are longer than "
                 "data.max_length=16 tokens .*data.truncation=drop"),
    "format mismatch": ({"prompt": "w1", "completion": "w2"}, ["data.format=instruction"], "no column instruction, "
                        "output for data.format=instruction"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_sft_input_is_one_clear_error(setup, tmp_path, case):
    row, overrides, message = BAD[case]
    data = tmp_path / "bad.jsonl"
    data.write_text((json.dumps(row) + "\n") * 20)
    out = tmp_path / "run"
    overrides = [o.format(causal=setup / "causal") for o in overrides]
    with pytest.raises(AdaptError, match=message):
        adapt.sft(_sft_cfg(setup, out, f"data.train={data}", *overrides))
    assert not out.exists() or not any(out.iterdir())


def test_bad_sft_input_through_the_cli_is_one_error_line_and_exit_2(setup, tmp_path, capfd):
    from adapt.cli import main  # in this process, stderr read at the fd (the CLI's new process: the test above)

    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "w1"}]}) + "\n")
    capfd.readouterr()
    code = main(["sft", str(ROOT / "recipes/sft/stories260k-tiny.yaml"), f"output_dir={tmp_path / 'run'}",
                 f"model.path={setup / 'dlm'}", f"data.train={data}", f"data.validation={data}", "data.max_length=32"])
    stderr = capfd.readouterr().err
    errors = [ln for ln in stderr.splitlines() if ln.startswith("dlm-adapt: error:")]
    assert code == 2 and len(errors) == 1, stderr[-2000:]
    assert "training sample 0: a conversation has no assistant turn" in errors[0]
    assert not (tmp_path / "run").exists()


def test_drop_reports_the_count_and_keeps_the_rest(tok, capsys):
    cfg = SFTDataConfig(chat_template=TEMPLATE, max_length=8, truncation="drop")
    rows = [{"prompt": "w5", "completion": "w6"}, {"prompt": " ".join(["w5"] * 10), "completion": "w6"}] * 3
    out = encode(rows, "prompt_completion", tok, TEMPLATE, cfg, "training")
    assert out.shape == (3, 8)  # three samples kept, of max_length tokens
    assert "dropped 3 training samples are longer than data.max_length=8" in capsys.readouterr().err


def test_every_shipped_sft_recipe_validates():
    recipes = sorted((ROOT / "recipes" / "sft").glob("*.yaml"))
    names = {p.stem for p in recipes}
    assert names >= {"stories260k-tiny", "smollm2-135m-lora", "qwen2.5-0.5b-full", "qwen2.5-7b-qlora",
                     "llama-3.1-8b-lora-fsdp", "qwen3-8b-lora-zero3"}
    for path in recipes:
        cfg = load_config(path, cls=SFTConfig)
        assert cfg.model.path and cfg.data.train and cfg.output_dir, path
        header = path.read_text().split("\n\n")[0]
        assert "Hardware:" in header and ("dlm-adapt sft" in header or "recipes/sft.py" in header), path


@pytest.mark.slow
def test_stories260k_recipe_runs_as_shipped_and_answers_in_chat(tmp_path):
    require_shared()
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}  # 1 per xdist worker
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "sft.py"),
                           str(ROOT / "recipes/sft/stories260k-tiny.yaml"), f"output_dir={out}"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    elbos = [json.loads(ln)["val_elbo"] for ln in (out / "metrics.jsonl").read_text().splitlines()
             if "val_elbo" in ln]
    assert elbos[-1] < elbos[0]
    from adapt.sampling.generate import generate

    [result] = generate(out / "final", ["Who is Lily?"], chat=True, max_new_tokens=32, steps=32)
    assert result["text"].strip() and "<|mask|>" not in result["text"]
    assert result["tokens"] and len(result["tokens"]) < 32  # the model learned to end its answer with EOS


@pytest.mark.slow
def test_sft_script_under_two_process_ddp_matches_one_process(setup, tmp_path):
    # torchrun gives real multi-CPU data parallelism that Accelerate picks up from the environment (see
    # test_train); per-sequence normalisation makes the mean of the per-process losses the global loss
    common = [f"model.path={setup / 'dlm'}", f"data.train={setup / 'chat.jsonl'}", "data.max_length=16",
              "max_steps=3", "eval_steps=0", "objective.normalization=sequence", "model.attn_implementation=eager"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    recipe = ROOT / "recipes/sft/stories260k-tiny.yaml"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "recipes" / "sft.py"), str(recipe), f"output_dir={tmp_path / 'two'}",
                          "train.batch_size=2", *common], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two" / "final" / "config.json").exists()
    adapt.sft(load_config(recipe, [f"output_dir={tmp_path / 'one'}", "train.batch_size=4", *common], cls=SFTConfig))

    def losses(out):
        return torch.tensor([json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()])

    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5, atol=0)


def test_sft_elbo_scores_only_answer_tokens(tok):
    # uniform logits: every scored token costs exactly log(V − 1) ([MASK] is never a clean token), whatever is
    # masked; and only answer tokens count
    from types import SimpleNamespace

    vocab = 101

    class Uniform(torch.nn.Module):
        config = SimpleNamespace(mask_token_id=vocab - 1, shift=True)

        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, attention_mask=None, **_):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, vocab))

    cfg = SFTDataConfig(chat_template=TEMPLATE, max_length=16, eos_padding="none")
    rows = Batch.cat(
        [encode([{"messages": CONVERSATION}], "messages", tok, TEMPLATE, cfg, "training"),
         encode([{"prompt": "w5", "completion": "w6 w7"}], "prompt_completion", tok, TEMPLATE, cfg, "training")])
    result = diffusion_elbo(Uniform(), rows, mc_samples=5, seed=0)
    assert result["tokens"] == 6 + 3  # w20 w21 w22 </s> w23 </s>, and w6 w7 </s>
    assert result["elbo_nats_per_token"] == pytest.approx(math.log(vocab - 1), rel=1e-6)


def test_block_sft_lowers_the_block_response_elbo_and_never_noises_the_prompt(setup, tmp_path, monkeypatch):
    """SFT with block.size: answers are noised one t per block, the prompt never; the block-wise ELBO of the
    answers falls."""
    import importlib

    train_module = importlib.import_module("adapt.training.recipe")

    seen = []
    original = train_module.noised_batch

    def spy(x0, maskable, *args, **kwargs):
        out = original(x0, maskable, *args, **kwargs)
        seen.append((out[2], out[3], out[4]))  # masked, maskable, t
        return out

    monkeypatch.setattr(train_module, "noised_batch", spy)
    cfg = _sft_cfg(setup, tmp_path / "run", "block.size=4", "max_steps=30", "eval_steps=30")
    model, tok = adapt.load(setup / "dlm")
    _, val, _ = build_sft_datasets(cfg.data, tok, None, cfg.train.seed)
    before = diffusion_elbo(model, val, mc_samples=4, seed=0, block_size=4)["elbo_nats_per_token"]
    final = adapt.sft(cfg)
    after = diffusion_elbo(adapt.load(final)[0], val, mc_samples=4, seed=0)["elbo_nats_per_token"]
    assert after < 0.8 * before, (before, after)
    assert json.loads((final / "config.json").read_text())["block_size"] == 4
    for masked, maskable, t in seen:
        assert not (masked & ~maskable).any()  # prompt and padding are never noised
        assert t.dim() == 2 and torch.equal(t[:, ::4].repeat_interleave(4, 1)[:, :t.shape[1]], t)  # t per block
