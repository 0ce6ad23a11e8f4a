"""Bad input: one clear line on stderr, a non-zero exit, and no OUTPUT left behind."""

import json
import re
import subprocess
import sys
from functools import partial

import pytest
from transformers import BertConfig

from tiny_models import save_tiny_source, tiny_tokenizer


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "adapt", "convert", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def _truncate(src):
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _corrupt_header(src):
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"{" * 32
    f.write_bytes(bytes(data))


def _bert(src):
    src.mkdir()
    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)


CASES = {
    "missing path": (lambda src: None, "does not exist"),
    "no config": (lambda src: src.mkdir(), "has no config.json"),
    "truncated safetensors": (lambda src: (save_tiny_source(src, "llama"), _truncate(src)), "corrupt or truncated"),
    "corrupt safetensors": (lambda src: (save_tiny_source(src, "llama"), _corrupt_header(src)), "corrupt or truncated"),
    "unsupported architecture": (_bert, "unsupported architecture 'bert'.*llama, mistral"),
    "multi-token mask string": (lambda src: save_tiny_source(src, "llama"), "is not a single token"),
}


def _in_process(capfd, *args):
    """`dlm-adapt convert` in this process (the function the command runs, its stderr read at the file
    descriptor); a command costs ~5 s of imports in a new process."""
    from adapt.cli import main

    capfd.readouterr()
    code = main(["convert", *map(str, args)])
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["convert", *args], code, out, err)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_cleanly(tmp_path, case, capfd):
    make, message = CASES[case]
    src = tmp_path / "does" / "not" / "exist" if case == "missing path" else tmp_path / "src"
    if case != "missing path":
        make(src)
    extra = ["--mask-token", "w1 w2"] if case == "multi-token mask string" else []
    # one case through a new process as a user runs it; the rest through the same function in this one
    proc = (_run if case == "unsupported architecture" else partial(_in_process, capfd))(src, tmp_path / "out", *extra)
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith("dlm-adapt: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(message, errors[0]), errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if case == "missing path" else ["src"])


def test_existing_output_without_overwrite(tmp_path):
    save_tiny_source(tmp_path / "src", "llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.json").write_text(json.dumps({"precious": True}))
    proc = _run(tmp_path / "src", tmp_path / "out")
    assert proc.returncode == 2 and "was not written by dlm-adapt" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mine.json"]


def test_cli_converts_and_reports(tmp_path):
    save_tiny_source(tmp_path / "src", "gpt2")
    proc = _run(tmp_path / "src", tmp_path / "out", "--dtype", "float32", "--no-shift")
    assert proc.returncode == 0, proc.stderr
    assert "converted" in proc.stdout
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["shift"] is False and config["text_config"]["model_type"] == "gpt2"
