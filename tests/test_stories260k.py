"""The real pretrained model in ../shared/models/stories260K (LLaMA architecture), converted in the test."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import adapt
from conftest import require_shared

TEXT = ["Once upon a time, there was a little girl named Lily. She loved to play outside.",
        "Tom had a big red ball."]


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    src = require_shared()
    out = tmp_path_factory.mktemp("stories") / "dlm"
    adapt.convert(src, out)
    return src, out


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_real_model_invariants(stories, impl):
    src, out = stories
    causal = AutoModelForCausalLM.from_pretrained(src, attn_implementation=impl).eval()
    model, tok = adapt.load(out, attn_implementation=impl)
    src_tok = AutoTokenizer.from_pretrained(src)
    assert tok.mask_token_id == model.config.mask_token_id == 512 and len(src_tok) == 512
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    ids = src_tok(TEXT[0], return_tensors="pt").input_ids
    assert tok(TEXT[0], return_tensors="pt").input_ids.equal(ids)  # tokenisation unchanged
    with torch.no_grad():
        # 1. ratio 0 reproduces the source
        torch.testing.assert_close(model(ids, is_causal=True).logits[..., :512], causal(ids).logits,
                                   atol=1e-5, rtol=0)
        # 2. bidirectional: a later token reaches position 0
        changed = ids.clone()
        changed[0, 6] = (changed[0, 6] + 1) % 512
        assert (model(ids).logits[0, 0] - model(changed).logits[0, 0]).abs().max() > 1e-4
        # 3. padding invariance, both sides (the tokenizer has no pad token; masked positions are ignored anyway).
        # Real logits are O(10): a padded softmax sums in another order, so allow float32 rounding (1e-4).
        tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        batch = tok(TEXT, return_tensors="pt", padding=True)
        padded = model(**batch).logits
        real = batch.attention_mask.bool()
        short = tok(TEXT[1], return_tensors="pt").input_ids
        torch.testing.assert_close(padded[1][real[1]], model(short).logits[0], atol=1e-4, rtol=0)
        tok.padding_side = "right"
        batch = tok(TEXT, return_tensors="pt", padding=True)
        padded = model(**batch).logits
        torch.testing.assert_close(padded[1][batch.attention_mask[1].bool()], model(short).logits[0],
                                   atol=1e-4, rtol=0)


def test_real_model_loads_with_transformers_alone(stories, tmp_path):
    _, out = stories
    script = textwrap.dedent("""
        import sys, torch
        sys.modules["adapt"] = None
        from transformers import AutoModel
        m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
        ids = torch.tensor([[1, 403, 407, 261, 378]])
        out = m.diffusion_generate(ids, max_new_tokens=12, steps=6)
        assert out.shape == (1, 17) and not (out == m.config.mask_token_id).any()
        torch.save(m(ids).logits, sys.argv[2])
    """)
    # the same thread count as this process: it sets the float reduction order the 1e-6 comparison relies on
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "mods"), "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-I", "-c", script, str(out), str(tmp_path / "l.pt")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, _ = adapt.load(out)
    with torch.no_grad():
        local = model(torch.tensor([[1, 403, 407, 261, 378]])).logits
    torch.testing.assert_close(torch.load(tmp_path / "l.pt", weights_only=True), local, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def adapted(stories, tmp_path_factory):
    """stories260K after 60 steps of the stories260K recipe: (final dir, ELBO before, ELBO after)."""
    from pathlib import Path

    from adapt.config import load_config
    from adapt.training.data import build_datasets
    from adapt.training.likelihood import diffusion_elbo
    from conftest import SHARED

    _, converted = stories
    out = tmp_path_factory.mktemp("adapted") / "run"
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "adaptation" / "stories260k.yaml"
    data = SHARED / "data" / "tinystories"
    cfg = load_config(recipe, [f"output_dir={out}", f"model.path={converted}", "max_steps=60",
                               "eval_steps=60", "save_steps=0", "sample_steps=0", "anneal.anneal_steps=20",
                               f"data.train={data / 'train.txt'}", f"data.validation={data / 'valid.txt'}",
                               "data.max_eval_sequences=32"])
    model, tok = adapt.load(converted)
    _, val = build_datasets(cfg.data, tok, 512, cfg.train.seed)
    before = diffusion_elbo(model, val[:32], mc_samples=1, batch_size=16, seed=1234)["elbo_nats_per_token"]
    final = adapt.train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return final, before, records[-1]["val_elbo"]


def test_short_adaptation_lowers_the_validation_elbo(adapted):
    """A couple of minutes of adaptation on TinyStories must clearly beat the freshly converted model."""
    _, before, after = adapted
    print(f"stories260K validation ELBO: {before:.3f} -> {after:.3f} nats/token after 60 steps")
    assert after < before - 1.0, (before, after)


def test_generate_on_the_adapted_model(adapted):
    final, _, _ = adapted
    proc = subprocess.run([sys.executable, "-m", "adapt", "generate", str(final), "--prompt", "Once upon a time",
                           "--prompt", "Tom and Lily", "--max-new-tokens", "32", "--steps", "32", "--block-length",
                           "8", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2 and all(r["text"].strip() and "<|mask|>" not in r["text"] for r in rows)
    assert all(512 not in r["tokens"] for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("job", ["train", "sft"])
def test_offline_run_prints_only_its_own_progress(job, tmp_path):
    """With the Hub offline, a train or sft run on the latest transformers prints its own progress bar and log
    lines, and nothing from the libraries under it (weight-loading bars, the `kernels` package's notices)."""
    from pathlib import Path

    from conftest import SHARED

    src = require_shared()
    root = Path(__file__).resolve().parents[1]
    common = [f"model.path={src}", "max_steps=1", "eval_steps=1", "sample_steps=0", "save_steps=0",
              f"output_dir={tmp_path / 'run'}", "train.batch_size=2"]
    if job == "train":
        data = SHARED / "data" / "tinystories"
        argv = [str(root / "recipes" / "adaptation" / "stories260k.yaml"), f"data.train={data / 'train.txt'}",
                f"data.validation={data / 'valid.txt'}", "data.seq_length=32", "data.max_eval_sequences=2"]
    else:
        argv = [str(root / "recipes" / "sft" / "stories260k-tiny.yaml"),
                f"data.train={root / 'recipes' / 'sft' / 'data' / 'tiny-chat.jsonl'}", "data.max_eval_samples=2"]
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "adapt", job, *argv, *common], capture_output=True, text=True,
                          env=env, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    done = "trained" if job == "train" else "fine-tuned"
    assert proc.stdout.splitlines() == [f"{done} -> {tmp_path / 'run' / 'final'}"]
    pieces = [p.strip() for p in proc.stderr.replace("\r", "\n").splitlines() if p.strip()]
    assert pieces and [p for p in pieces if not p.startswith(("train:", "dlm-adapt:"))] == [], proc.stderr[-2000:]
