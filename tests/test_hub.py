"""Hub ids go through huggingface_hub.snapshot_download, then the directory code path. No network here:
the download is replaced by a local snapshot, and the offline failure must be one clear error."""

import json

import huggingface_hub
import pytest

import adapt
from adapt import AdaptError
from tiny_models import save_tiny_source


def test_hub_id_downloads_then_converts(tmp_path, monkeypatch):
    snapshot = tmp_path / "snapshot"
    save_tiny_source(snapshot, "qwen3")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    adapt.convert("someorg/tiny-qwen3", tmp_path / "out", revision="v1")
    (repo_id, revision, patterns), = calls
    assert (repo_id, revision) == ("someorg/tiny-qwen3", "v1")
    assert "*.safetensors" in patterns and not any(p.endswith((".bin", ".pt", ".pkl", ".py")) for p in patterns)
    prov = json.loads((tmp_path / "out" / "config.json").read_text())["provenance"]
    assert prov["source"] == "someorg/tiny-qwen3" and prov["revision"] == "v1"


def test_hub_id_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AdaptError, match="not a local path, and downloading it from the Hugging Face Hub failed"):
        adapt.convert("someorg/does-not-exist", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_unreachable_hub_is_one_line_at_once_not_a_minute_of_retries(tmp_path, monkeypatch, capsys):
    """Online mode with no route to the Hub: one probe, then the local cache only (huggingface_hub alone retries
    each file for ~25 s and logs every retry)."""
    import time

    from huggingface_hub import constants

    from adapt.cli import main
    from adapt.sources import hub_reachable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    hub_reachable.cache_clear()
    try:
        for argv in (["generate", "someorg/nomodel", "--prompt", "w1"],
                     ["convert", "someorg/nomodel", str(tmp_path / "out")]):
            start = time.monotonic()
            assert main(argv) == 2
            assert time.monotonic() - start < 20
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "the Hub (http://127.0.0.1:9) cannot be reached" in err[0], err
        assert not (tmp_path / "out").exists()
    finally:
        hub_reachable.cache_clear()
