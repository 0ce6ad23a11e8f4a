"""Drafter training (`drafter.enabled`, issue 25): a short run raises the acceptance that speculative decoding itself
measures, the output stays the parent's greedy text, the parent's tensors reach OUTPUT/final byte for byte, a
resumed run reproduces the uninterrupted one, and the self-distillation data is written once into the run."""

import json
import random
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import adapt
from adapt.config import load_config
from adapt.errors import AdaptError
from adapt.training.drafter_training import _with_continuation, check_parent_untouched, greedy_walk
from conftest import STORIES
from tiny_models import save_tiny_source, with_chat_template

SHARED_TEXT = STORIES.parent.parent / "data" / "tinystories"


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaMA whose next-token distributions are peaked (final norm x 12: the argmax, so the greedy text, is
    the random model's; TV then measures greedy disagreement), and a few lines of text."""
    root = tmp_path_factory.mktemp("drafter-train")
    source = save_tiny_source(root / "src", "llama")
    with torch.no_grad():
        source.model.norm.weight.mul_(12.0)
    source.save_pretrained(root / "src")
    rng = random.Random(0)
    docs = [" ".join(f"w{rng.randrange(96)}" for _ in range(rng.randrange(8, 14))) for _ in range(60)]
    (root / "train.txt").write_text("\n\n".join(docs))
    return root, source


def _config(root, out, *extra):
    return load_config(None, [
        f"output_dir={out}", f"model.path={root / 'src'}", "drafter.enabled=true", "drafter.rank=8", "block.size=4",
        "anneal.mode=none", f"data.train={root / 'train.txt'}", "data.generate.prompts=8",
        "data.generate.prompt_length=4", "data.generate.new_tokens=28", "data.max_eval_sequences=4", "eval_steps=10",
        "save_steps=0", "train.batch_size=8", "train.lr=0.01", "train.warmup_steps=0", *extra])


def _decode(directory, prompts, n):
    model, _ = adapt.load(directory)
    out = model.eval().diffusion_generate(prompts, max_new_tokens=n, speculative=True, return_dict_in_generate=True)
    return out.sequences, float(out.row_committed.sum() / out.row_nfe.sum())


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_training_raises_the_decoders_acceptance_and_keeps_the_parent(tiny, tmp_path):
    root, source = tiny
    final = adapt.train(_config(root, tmp_path / "run", "max_steps=40"))
    rows = load_file(str(tmp_path / "run" / "self_distill.safetensors"))
    assert rows["train"].shape == (8, 32) and rows["validation"].shape[1] == 32
    prompts = rows["train"][:, :4]
    reference = source.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                max_new_tokens=28, pad_token_id=3)
    assert torch.equal(rows["train"], reference)  # the training text is the parent's greedy continuation
    # the training prompts: 8 of them, which a short run learns (this is about the loop, not generalisation)
    before, untrained = _decode(tmp_path / "run" / "converted", prompts, 28)
    after, trained = _decode(final, prompts, 28)
    assert torch.equal(before, reference) and torch.equal(after, reference)  # the parent's text, token for token
    assert trained >= untrained + 0.1, (untrained, trained)
    # only the drafter changed; the parent's tensors are the source's, byte for byte
    converted, written = _tensors(tmp_path / "run" / "converted"), _tensors(final)
    assert written.keys() == converted.keys()
    changed = {name for name in written if not torch.equal(written[name], converted[name])}
    assert changed and all(name.startswith("drafter.") for name in changed)
    config = json.loads((final / "config.json").read_text())
    assert config["drafter"]["rank"] == 8 and config["block_size"] == 4
    assert (final / "drafter_masked_diffusion.py").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_tv" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    assert len(evals[0]["val_acceptance"]) == len(evals[0]["val_greedy_acceptance"]) == 4
    assert 1 <= evals[-1]["val_greedy_tokens_per_round"] <= 5
    assert 1 <= evals[-1]["val_greedy_tokens_per_forward"] <= 5


def test_the_greedy_walk_is_what_decoding_does(tiny, tmp_path):
    """Validation's `val_greedy_tokens_per_forward`: on rows that are the parent's greedy continuations, the walk
    over the training view's groups gives each row's tokens and forwards of greedy speculative decoding exactly."""
    root, _ = tiny
    final = adapt.train(_config(root, tmp_path / "run", "max_steps=20"))
    rows = load_file(str(tmp_path / "run" / "self_distill.safetensors"))["train"]
    model, _ = adapt.load(final)
    model.eval()
    batch = _with_continuation(rows, None, 28)
    for row in range(len(rows)):
        tokens, forwards = greedy_walk(model, batch[row], 4)
        out = model.diffusion_generate(rows[row:row + 1, :4], max_new_tokens=tokens, speculative=True,
                                       draft_length=4, guess_bonus=False, return_dict_in_generate=True)
        assert (int(out.row_committed[0]), int(out.row_nfe[0])) == (tokens, forwards)
        assert torch.equal(out.sequences[0], rows[row, :4 + tokens])


def test_resume_reproduces_the_uninterrupted_run(tiny, tmp_path):
    root, _ = tiny
    whole = tmp_path / "whole"
    adapt.train(_config(root, whole, "max_steps=4", "eval_steps=2", "drafter.loss=kl", "drafter.groups=5"))
    split = tmp_path / "split"
    assert adapt.train(_config(root, split, "max_steps=4", "eval_steps=2", "drafter.loss=kl", "drafter.groups=5",
                               "save_steps=2", "stop_after=2")) is None
    written = (split / "self_distill.safetensors").stat().st_mtime_ns
    adapt.train(_config(root, split, "max_steps=4", "eval_steps=2", "drafter.loss=kl", "drafter.groups=5",
                        "save_steps=2", "resume=true"))
    assert (split / "self_distill.safetensors").stat().st_mtime_ns == written  # generated once, reused

    def metrics(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    a, b = metrics(whole), metrics(split)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x.get("val_acceptance") == y.get("val_acceptance")
    assert _tensors(whole / "final").keys() == _tensors(split / "final").keys()
    assert all(torch.equal(t, _tensors(split / "final")[n]) for n, t in _tensors(whole / "final").items())
    # other data.generate settings do not silently reuse the rows of the first ones
    with pytest.raises(AdaptError, match="other data.generate settings"):
        adapt.train(_config(root, split, "max_steps=6", "drafter.loss=kl", "drafter.groups=5", "resume=true",
                            "data.generate.new_tokens=20"))


def test_chat_prompts_are_the_templated_turns_and_their_rows_are_right_padded(tiny, tmp_path):
    """data.generate.chat_message: each training row is the prompt as `generate --chat` tokenizes it (the chat
    template around the message) and the parent's greedy continuation of it alone; prompts of different lengths
    leave their padding at the end, out of the attention mask, and the drafter trains on them."""
    from transformers import AutoTokenizer

    root, source = tiny
    # a template whose length depends on the message, so that the prompts need padding
    chat_src = with_chat_template(root / "src", tmp_path / "chat-src", "{% for m in messages %}w1 {% if 'w5' in "
                                  "m['content'] %}w6 {% endif %}{{ m['content'] }}{% endfor %} w2")
    tokenizer = AutoTokenizer.from_pretrained(chat_src)
    adapt.train(_config(root, tmp_path / "run", f"model.path={chat_src}", "max_steps=2", "eval_steps=2",
                        "data.generate.chat_message=w3 {text}"))
    rows = load_file(str(tmp_path / "run" / "self_distill.safetensors"))
    ids, mask = rows["train"], rows["train_attention_mask"]
    lengths = mask.sum(1)
    assert lengths.min() < lengths.max()  # some prompts were padded
    templated = {tuple(tokenizer(tokenizer.apply_chat_template(
        [{"role": "user", "content": "w3 " + " ".join(doc.split()[:4])}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False).input_ids) for doc in (root / "train.txt").read_text().split("\n\n")}
    for row, m, n in zip(ids, mask, lengths.tolist()):
        prompt = row[:n - 28]
        assert tuple(prompt.tolist()) in templated  # as `generate --chat` tokenizes a training document's prompt
        alone = source.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]), do_sample=False,
                                max_new_tokens=28, eos_token_id=None, pad_token_id=3)
        assert torch.equal(row[:n], alone[0])  # the parent's continuation of this prompt alone
        assert m[:n].all() and not m[n:].any()  # the padding last


def test_a_drafter_checkpoint_trains_on_text_with_a_draft_length_schedule(tiny, tmp_path):
    root, _ = tiny
    drafter = adapt.convert(root / "src", tmp_path / "drafter", block_size=4, drafter=True, drafter_rank=4)
    final = adapt.train(_config(root, tmp_path / "run", f"model.path={drafter}", "data.generate.prompts=0",
                                "data.seq_length=16", "block.schedule=[2,4]", "block.stage_steps=1",
                                "max_steps=2", "eval_steps=1", "drafter.loss=ce", "train.batch_size=2"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["block_size"] for r in records] == [2, 4]  # the draft length grows
    assert [len(r["val_acceptance"]) for r in records] == [2, 4]
    check_parent_untouched(drafter, final)


def test_a_changed_parent_is_refused(tiny, tmp_path):
    root, _ = tiny
    drafter = adapt.convert(root / "src", tmp_path / "drafter", block_size=4, drafter=True, drafter_rank=4)
    other = tmp_path / "other"
    shutil.copytree(drafter, other)
    tensors = _tensors(other)
    name = next(n for n in tensors if n.startswith("decoder.") and n.endswith("weight"))
    tensors[name] = tensors[name] + 1e-3
    from safetensors.torch import save_file

    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AdaptError, match="change the parent's weights"):
        check_parent_untouched(drafter, other)


@pytest.mark.slow
@pytest.mark.skipif(not STORIES.is_dir(), reason="needs ../shared/models/stories260K beside the checkout")
def test_stories260k_drafter_accepts_more_of_held_out_text(tmp_path):
    """The real model, held-out prompts: a short distillation on the parent's continuations raises the tokens per
    forward of speculative decoding, and the output is the parent's greedy text."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, [
        f"output_dir={tmp_path / 'run'}", f"model.path={STORIES}", "drafter.enabled=true", "block.size=4",
        "anneal.mode=none", f"data.train={SHARED_TEXT / 'train.txt'}", f"data.validation={SHARED_TEXT / 'valid.txt'}",
        "data.generate.prompts=128", "data.generate.prompt_length=16", "data.generate.new_tokens=64",
        "data.max_eval_sequences=8", "max_steps=40", "eval_steps=40", "save_steps=0", "train.batch_size=8",
        "train.lr=3e-3", "train.warmup_steps=5"])
    final = adapt.train(cfg)
    prompts = load_file(str(tmp_path / "run" / "self_distill.safetensors"))["validation"][:, :16]
    parent = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    reference = parent.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                max_new_tokens=48, pad_token_id=0)
    before, untrained = _decode(tmp_path / "run" / "converted", prompts, 48)
    after, trained = _decode(final, prompts, 48)
    assert torch.equal(before, reference) and torch.equal(after, reference)
    assert trained >= untrained + 0.08, (untrained, trained)  # measured: 1.12 -> 1.25


def test_the_recipes_alpha_and_targets_reach_the_converted_drafter(tiny, tmp_path):
    """`drafter.alpha` and `drafter.targets` shape the adapter a causal source is converted with, and the trained
    final keeps them."""
    root, _ = tiny
    final = adapt.train(_config(root, tmp_path / "run", "drafter.alpha=4", "drafter.targets=[v_proj,q_proj]",
                                "max_steps=1", "eval_steps=0"))
    spec = json.loads((final / "config.json").read_text())["drafter"]
    assert spec["rank"] == 8 and spec["alpha"] == 4 and spec["targets"] == ["q_proj", "v_proj"]
    assert {name.split(".")[2].rsplit("__", 1)[-1] for name in _tensors(final) if name.startswith("drafter.lora.")} \
        == {"q_proj", "v_proj"}
