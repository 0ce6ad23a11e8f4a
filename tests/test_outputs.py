"""Outputs against real directories: only a previous dlm-adapt output of the same kind is ever replaced, a path
that appears during a run is never clobbered, and a diverged run leaves no final model."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import adapt
from adapt import AdaptError
from adapt.config import load_config
from adapt.outputs import MARKER, STALE_SECONDS, write_marker
from conftest import SHARED, require_shared
from tiny_models import save_tiny_source

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("outputs") / "src"
    save_tiny_source(path, "llama")
    return path


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("dlm-adapt: error: ")]


def test_two_concurrent_converts_one_wins_the_other_refuses(src, tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "adapt", "convert", str(src), str(out)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert len(_error_lines(loser)) == 1 and "Traceback" not in loser, loser
    assert (out / "config.json").exists() and json.loads((out / MARKER).read_text())["kind"] == "convert"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the loser removed only its own temporary directory


def test_a_folder_created_at_output_during_conversion_survives(src, tmp_path, monkeypatch):
    conversion = importlib.import_module("adapt.conversion.convert")
    out = tmp_path / "out"
    real = conversion._write_config

    def user_creates_output(*args, **kwargs):
        real(*args, **kwargs)
        out.mkdir()
        (out / "mine.txt").write_text("created while converting")

    monkeypatch.setattr(conversion, "_write_config", user_creates_output)
    for overwrite in (False, True):
        if out.exists():
            (out / "mine.txt").unlink()
            out.rmdir()
        with pytest.raises(AdaptError, match="appeared while this run was writing"):
            adapt.convert(src, out, overwrite=overwrite)
        assert (out / "mine.txt").read_text() == "created while converting"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_only_old_temporary_directories_of_our_own_are_cleaned(src, tmp_path):
    ours_old, ours_new, foreign_old = (tmp_path / f".out.tmp-{n}" for n in ("a", "b", "c"))
    for d in (ours_old, ours_new, foreign_old):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    write_marker(ours_old, "convert")
    write_marker(ours_new, "convert")
    old = time.time() - STALE_SECONDS - 60
    for d in (ours_old, foreign_old):
        os.utime(d, (old, old))
    adapt.convert(src, tmp_path / "out")
    assert not ours_old.exists()
    assert ours_new.exists() and (foreign_old / "model.safetensors").read_bytes() == b"partial"


def test_ctrl_c_during_convert_is_one_line_exit_130_and_no_output(src, tmp_path):
    out = tmp_path / "out"
    code = (  # SIGINT as a terminal sends it: a test runner's worker may hand its children an ignored SIGINT
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import importlib\n"
        "c = importlib.import_module('adapt.conversion.convert')\n"
        "real = c._write_config\n"
        "def slow(*a, **k):\n"
        "    real(*a, **k)\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(120)\n"
        "c._write_config = slow\n"
        "from adapt.cli import main\n"
        f"sys.exit(main(['convert', {str(src)!r}, {str(out)!r}]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=60)  # reads both pipes, so a chatty child cannot block on a full one
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"convert did not exit within 60 s of SIGINT; its stderr ends: {proc.communicate()[1][-2000:]}")
    assert proc.returncode == 130
    assert "Traceback" not in stderr and len(_error_lines(stderr)) == 1 and "interrupted" in stderr, stderr
    assert list(tmp_path.iterdir()) == []


def _train_cfg(src, out, *overrides):
    data = out.parent / "train.txt"
    data.write_text("\n\n".join(" ".join(f"w{(i + j) % 90}" for j in range(12)) for i in range(40)))
    return load_config(None, [f"output_dir={out}", f"model.path={src}", f"data.train={data}", "data.seq_length=8",
                              "train.batch_size=2", "max_steps=1", "eval_steps=0", "save_steps=0",
                              "model.attn_implementation=eager", *overrides])


def test_rerunning_a_finished_run_resumes_or_is_refused(src, tmp_path):
    out = tmp_path / "run"
    adapt.train(_train_cfg(src, out))
    kept = {p: p.read_bytes() for p in [out / "metrics.jsonl", out / "final" / "model.safetensors"]}
    with pytest.raises(AdaptError, match="set resume=true to continue it, overwrite=true .* or choose a new "
                                         "output_dir"):
        adapt.train(_train_cfg(src, out))
    with pytest.raises(AdaptError, match=r"model.shift=False \(was True\)"):  # OUTPUT/converted has shift
        adapt.train(_train_cfg(src, out, "resume=true", "model.shift=false"))
    assert {p: p.read_bytes() for p in kept} == kept
    # resuming from a checkpoint inside output_dir, named by path
    adapt.train(_train_cfg(src, out, "stop_after=1", "max_steps=3", "overwrite=true"))
    adapt.train(_train_cfg(src, out, f"resume={out / 'checkpoints' / 'step-00000001'}", "max_steps=3"))
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    adapt.train(_train_cfg(src, out, "overwrite=true", "model.shift=false", "max_steps=2"))
    assert json.loads((out / "converted" / "config.json").read_text())["shift"] is False  # converted again
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_float16_divergence_stops_with_one_error_and_keeps_the_last_good_checkpoint(tmp_path):
    stories = require_shared()
    data = SHARED / "data" / "tinystories" / "train.txt"
    if not data.is_file():
        pytest.skip(f"needs {data}")
    out = tmp_path / "run"

    def cfg(*overrides):
        return load_config(None, [f"output_dir={out}", f"model.path={stories}", f"data.train={data}",
                                  "data.seq_length=64", "train.batch_size=4", "train.lr=3e-3", "max_steps=6",
                                  "save_steps=1", "eval_steps=0", "model.attn_implementation=eager", *overrides])

    diverged = r"diverged at step \d+: .*use model.dtype=bfloat16 or float32.*No final model was written"
    with pytest.raises(AdaptError, match=diverged + "; no checkpoint was written"):
        adapt.train(cfg("model.dtype=float16"))  # float16 Adam overflows in its first update
    assert not (out / "final").exists() and not list((out / "checkpoints").glob("step-*"))
    adapt.train(cfg("overwrite=true", "stop_after=2"))  # float32: two good steps, checkpointed
    good = out / "checkpoints" / "step-00000002"
    kept = {p.name: p.read_bytes() for p in good.iterdir()}
    with pytest.raises(AdaptError, match=diverged + f"; the last good checkpoint is {good}$") as e:
        adapt.train(cfg("resume=true", "model.dtype=float16"))
    assert "\n" not in str(e.value)
    assert not (out / "final").exists() and {p.name: p.read_bytes() for p in good.iterdir()} == kept
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*"))[-1] == good.name


def test_a_full_disk_is_one_line_and_publishes_nothing(src, tmp_path, monkeypatch, capsys):
    """ENOSPC while a conversion is written, and while a training checkpoint is: one line, no output, no temporary
    directory, and the run's earlier checkpoint stays the newest. (Real full disks give the same errors: checked
    on a 400 KiB tmpfs.)"""
    import errno

    from safetensors import SafetensorError

    from adapt.cli import main

    conversion = importlib.import_module("adapt.conversion.convert")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x"))

    with monkeypatch.context() as m:
        m.setattr(conversion, "_write_config", full)
        assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0] and os.strerror(errno.ENOSPC) in err[0], err
    assert list(tmp_path.iterdir()) == []

    checkpointing = importlib.import_module("adapt.training.training_state")
    real, calls = checkpointing.save_file, []

    def full_at_second_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpointing, "save_file", full_at_second_save)
    out = tmp_path / "run"
    with pytest.raises(AdaptError, match="cannot write .*step-00000002: SafetensorError while writing"):
        adapt.train(_train_cfg(src, out, "max_steps=3", "save_steps=1"))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]
    assert not (out / "final").exists()
