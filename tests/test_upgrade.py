"""`dlm-adapt upgrade` on a checkpoint written by dlm-adapt 0.1.0 (tests/data/dlm-0.1.0, converted by that release
from tests/data/tiny-llama): its remote code broke on transformers 5.24; after the upgrade it loads and runs with
transformers alone, with weights byte-identical and the logits of a fresh conversion."""

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

import adapt
from adapt.cli import main
from adapt.model import MODEL_FILES
from adapt.model.transformers_compat import _release, newer_than_tested
from tiny_models import save_tiny_source

DATA = Path(__file__).parent / "data"
LEGACY = DATA / "dlm-0.1.0"

_RUN_ALONE = textwrap.dedent("""
    import json, sys, torch
    sys.modules["adapt"] = None  # transformers alone
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(torch.arange(4, 14)[None]).logits
    tokens = model.diffusion_generate(torch.arange(4, 8)[None], max_new_tokens=6, steps=6, block_length=3,
                                      kv_cache="dual")
    print(json.dumps({"logits": logits.tolist(), "tokens": tokens.tolist()}))
""")


def _run_alone(path, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run([sys.executable, "-I", "-c", _RUN_ALONE, str(path)], capture_output=True, text=True,
                          env=env, timeout=300, stdin=subprocess.DEVNULL)


def _digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def legacy(tmp_path):
    shutil.copytree(LEGACY, tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.mark.skipif(_release(transformers.__version__) < (5, 24), reason="0.1.0's code needs transformers "
                    "internals of 5.2x (SubConfigSpec); before 5.24 only its upgrade is tested")
def test_legacy_checkpoint_with_transformers_alone_on_this_release(legacy, tmp_path):
    """0.1.0's real files with transformers alone, as each release treats them: 5.24 renamed the cache keyword and
    broke them (the breakage `upgrade` exists for); 5.25 added a shim that renames it back, so they run again, with
    the logits of a fresh conversion. A release newer than any tested may do either;
    `test_upgrade_makes_legacy_checkpoint_run_with_transformers_alone` covers every release."""
    proc = _run_alone(legacy, tmp_path)
    broke = proc.returncode != 0 and "unexpected keyword argument 'cache'" in proc.stderr
    if _release(transformers.__version__)[:2] == (5, 24):
        assert broke, proc.stderr[-2000:]
        return
    if newer_than_tested(transformers.__version__) and broke:
        return
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    model, _ = adapt.load(adapt.convert(DATA / "tiny-llama", tmp_path / "fresh"))
    with torch.no_grad():
        expected = model(torch.arange(4, 14)[None]).logits
    torch.testing.assert_close(torch.tensor(got["logits"]), expected, atol=1e-6, rtol=0)


def test_legacy_checkpoint_names_upgrade_in_dlm_adapt(legacy, capsys):
    before = _digests(legacy)
    assert main(["upgrade", str(legacy), "--check"]) == 1
    out = capsys.readouterr().out
    assert "dlm-adapt 0.1.0" in out and f"dlm-adapt upgrade {legacy}" in out
    assert main(["push", str(legacy), "me/model", "--dry-run"]) == 2
    assert f"dlm-adapt upgrade {legacy}" in capsys.readouterr().err
    adapt.load(legacy)  # this package's own classes still run it, and say what to do for transformers alone
    assert f"dlm-adapt upgrade {legacy}" in capsys.readouterr().err
    assert _digests(legacy) == before  # --check, push and load wrote nothing


def test_upgrade_makes_legacy_checkpoint_run_with_transformers_alone(legacy, tmp_path, capsys):
    weights = (legacy / "model.safetensors").read_bytes()
    assert main(["upgrade", str(legacy)]) == 0
    assert "upgraded" in capsys.readouterr().out
    assert (legacy / "model.safetensors").read_bytes() == weights
    for f in MODEL_FILES:
        assert (legacy / f.name).read_bytes() == f.read_bytes()
    assert not list(legacy.glob(".*tmp*"))

    fresh = adapt.convert(DATA / "tiny-llama", tmp_path / "fresh")
    model, _ = adapt.load(fresh)
    assert "upgrade" not in capsys.readouterr().err  # a fresh conversion is current
    proc = _run_alone(legacy, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        expected = model(torch.arange(4, 14)[None]).logits
    torch.testing.assert_close(torch.tensor(got["logits"]), expected, atol=1e-6, rtol=0)
    ours = model.diffusion_generate(torch.arange(4, 8)[None], max_new_tokens=6, steps=6, block_length=3,
                                    kv_cache="dual")
    assert got["tokens"] == ours.tolist()

    after = _digests(legacy)  # a second upgrade, and --check, change nothing
    assert main(["upgrade", str(legacy), "--check"]) == 0 and main(["upgrade", str(legacy)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert _digests(legacy) == after
    assert main(["push", str(legacy), "me/model", "--dry-run"]) == 0


def test_upgrade_gives_a_checkpoint_without_pad_token_eos_as_pad(legacy):
    tok_file, gen_file = legacy / "tokenizer_config.json", legacy / "generation_config.json"
    tok, gen = json.loads(tok_file.read_text()), json.loads(gen_file.read_text())
    del tok["pad_token"], gen["pad_token_id"]  # as 0.1.0 wrote checkpoints of sources without one (stories260K)
    tok_file.write_text(json.dumps(tok))
    gen_file.write_text(json.dumps(gen))
    result = adapt.upgrade(legacy)
    assert {"tokenizer_config.json", "generation_config.json"} <= set(result.changes)
    model, tokenizer = adapt.load(legacy)
    assert tokenizer.pad_token == "</s>" and model.generation_config.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token_id != model.config.mask_token_id


def test_converting_a_source_without_pad_token_batches_prompts(tmp_path):
    save_tiny_source(tmp_path / "src", "llama", pad_token=False)
    out = adapt.convert(tmp_path / "src", tmp_path / "dlm")
    model, tokenizer = adapt.load(out)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id != model.config.mask_token_id
    assert model.generation_config.pad_token_id == tokenizer.eos_token_id
    assert json.loads((out / "config.json").read_text())["provenance"]["pad_token_case"] == "eos"
    batch = tokenizer(["w1 w2 w3", "w4"], return_tensors="pt", padding=True)  # raised before: no pad token
    out = model.diffusion_generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=4, steps=4)
    assert not (out == model.config.mask_token_id).any()
    with torch.no_grad():  # the EOS used as pad is masked out: the short row's logits are its own
        alone = model(tokenizer(["w4"], return_tensors="pt").input_ids).logits[0]
        padded = model(batch.input_ids, attention_mask=batch.attention_mask).logits[1, -1:]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


def test_upgrade_never_downgrades_newer_code(legacy, capsys):
    adapt.upgrade(legacy)
    compat = legacy / "transformers_compat.py"
    compat.write_text(compat.read_text().replace(f'DLM_ADAPT_VERSION = "{adapt.__version__}"',
                                                 'DLM_ADAPT_VERSION = "99.0.0"'))
    before = _digests(legacy)
    assert main(["upgrade", str(legacy)]) == 2
    assert "newer than this" in capsys.readouterr().err
    assert _digests(legacy) == before


@pytest.mark.parametrize("make, phrase", [
    (lambda d: shutil.copytree(DATA / "tiny-llama", d), "'llama' checkpoint, not a dlm-adapt"),
    (lambda d: d.mkdir(), "has no config.json"),
    (lambda d: (d.mkdir(), (d / "adapter_config.json").write_text("{}")), "is a PEFT adapter"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{oops")), "not valid JSON"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "masked_diffusion_lm"}')), "no *.safetensors"),
    (lambda d: d.write_text("x"), "is not a directory"),
], ids=["causal", "empty", "adapter", "bad-json", "no-weights", "file"])
def test_upgrade_refuses_what_is_not_a_dlm_adapt_checkpoint(tmp_path, capsys, make, phrase):
    target = tmp_path / "target"
    make(target)
    before = _digests(target) if target.is_dir() else target.read_bytes()
    assert main(["upgrade", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and phrase in err, err
    assert (_digests(target) if target.is_dir() else target.read_bytes()) == before
