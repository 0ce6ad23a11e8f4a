"""`dlm-adapt push`: validation, the model card (golden), and uploads against a local fake Hub that records what
huggingface_hub sends (repo create, branch, preupload, commit), including failures and the token's secrecy."""

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import pytest
import yaml

import adapt
from adapt import AdaptError
from adapt.cli import main
from adapt.config import load_config
from adapt.model import CODE_FILES
from adapt.outputs import write_marker
from adapt.hub.card import BEGIN, END
from tiny_models import save_tiny_source, write_word_runs

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "push_card_llama.md"
TOKEN = "hf_SECRETxyz"
APACHE = "\n                                 Apache License\n                           Version 2.0, January 2004\n"


class FakeHub:
    """The Hub endpoints huggingface_hub's create_repo / create_branch / create_commit call, with every file
    answered as a regular (base64-in-commit) upload; branches hold {path: bytes}."""

    def __init__(self):
        self.requests = []  # (method, path, headers, body)
        self.repos = {}  # repo_id -> {"visibility": ..., "branches": {name: {path: bytes}}}
        self.commits = []  # (repo_id, branch, header dict)
        self.fail_commits = 0  # answer this many commit POSTs with HTTP 500
        self.reject_auth = False
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub._handle(self, "GET")

            def do_POST(self):
                hub._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id, branch="main"):
        return self.repos.get(repo_id, {}).get("branches", {}).get(branch, {})

    def _body(self, h):
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(h.rfile.readline().strip(), 16)
                if size == 0:
                    h.rfile.readline()
                    return data
                data += h.rfile.read(size)
                h.rfile.readline()
        return h.rfile.read(int(h.headers.get("Content-Length") or 0))

    def _handle(self, h, method):
        body = self._body(h) if method == "POST" else b""
        path = unquote(urlsplit(h.path).path)
        self.requests.append((method, path, {k.lower(): v for k, v in h.headers.items()}, body))
        if self.reject_auth:
            return _reply(h, 401, {"error": "Invalid credentials in Authorization header"},
                          {"X-Error-Message": "Invalid credentials in Authorization header"})
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else \
                f"me/{payload['name']}"
            if repo_id in self.repos:
                return _reply(h, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
            self.repos[repo_id] = {"visibility": payload.get("visibility"), "branches": {"main": {}}}
            return _reply(h, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id})
        if method == "POST" and path == "/api/validate-yaml":
            yaml.safe_load(json.loads(body)["content"].split("---")[1])  # a malformed block would raise here
            return _reply(h, 200, {"errors": [], "warnings": []})
        parts = path.split("/")  # /api/models/{ns}/{name}/{action}/{rev...}
        if method == "POST" and len(parts) >= 7 and parts[:3] == ["", "api", "models"]:
            repo_id, action, rev = f"{parts[3]}/{parts[4]}", parts[5], "/".join(parts[6:])
            repo = self.repos.get(repo_id)
            if repo is None:
                return _reply(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            if action == "branch":
                if rev in repo["branches"]:
                    return _reply(h, 409, {"error": "Reference already exists"})
                repo["branches"][rev] = dict(repo["branches"]["main"])
                return _reply(h, 200, {})
            if rev not in repo["branches"]:
                return _reply(h, 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            if action == "preupload":
                files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                         for f in json.loads(body)["files"]]
                return _reply(h, 200, {"files": files, "commitOid": "0" * 40})
            if action == "commit":
                if self.fail_commits > 0:
                    self.fail_commits -= 1
                    return _reply(h, 500, {"error": "Internal Error"})
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                staged = dict(repo["branches"][rev])
                for item in lines[1:]:
                    if item["key"] != "file":  # only regular uploads are answered for
                        return _reply(h, 400, {"error": f"unexpected {item['key']}"})
                    staged[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                repo["branches"][rev] = staged
                self.commits.append((repo_id, rev, lines[0]["value"]))
                oid = f"{len(self.commits):040x}"
                return _reply(h, 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                       "pullRequestUrl": None})
        return _reply(h, 404, {"error": "not found"})


def _reply(h, status, payload, headers=None):
    data = json.dumps(payload).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(data)


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


def _push(tmp_path, endpoint, *args, token=TOKEN):
    """`dlm-adapt push` in a fresh process, as a user runs it: huggingface_hub reads HF_ENDPOINT at import time."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf-home"), "NO_PROXY": "127.0.0.1,localhost", "OMP_NUM_THREADS": "1"}
    if token:
        env["HF_TOKEN"] = token
    proc = subprocess.run([sys.executable, "-m", "adapt", "push", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert TOKEN not in proc.stdout + proc.stderr
    return proc


@pytest.fixture
def online(monkeypatch, tmp_path, capfd):
    """In-process pushes against a given endpoint: huggingface_hub's constants patched (the endpoint, offline mode
    that conftest sets, the saved-login path), the token in HF_TOKEN, no waits between commit attempts.
    Returns push(endpoint, *cli_args, token=TOKEN) -> result with returncode/stdout/stderr."""
    from huggingface_hub import constants

    import adapt.hub.push

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))
    monkeypatch.setattr(adapt.hub.push, "COMMIT_RETRY_DELAYS", (0.0, 0.0))

    def push(endpoint, *args, token=TOKEN):
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        else:
            monkeypatch.delenv("HF_TOKEN", raising=False)
        capfd.readouterr()
        rc = main(["push", *map(str, args)])
        out, err = capfd.readouterr()
        assert TOKEN not in out + err
        return SimpleNamespace(returncode=rc, stdout=out, stderr=err)

    return push


def _snapshot(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _error_line(proc) -> str:
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith("dlm-adapt: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


def _all_authenticated(hub) -> bool:
    """Every repo request carried the token (huggingface_hub also fetches a registry of its own, anonymously)."""
    repo_calls = [r for r in hub.requests if r[1].startswith(("/api/repos/", "/api/models/", "/api/validate-yaml"))]
    return bool(repo_calls) and all(r[2].get("authorization") == f"Bearer {TOKEN}" for r in repo_calls)


def _card_parts(card: str) -> tuple[dict, str]:
    _, block, body = card.split("---\n", 2)
    return yaml.safe_load(block), body.lstrip("\n")


def _checkpoint_copy(converted, tmp_path, name="tiny-dlm") -> Path:
    _, dlm = converted("llama")
    out = tmp_path / name
    shutil.copytree(dlm, out)
    return out


def _expected_upload(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*")
            if p.is_file() and p.name != "README.md" and not p.name.startswith(".")}


# ---------------------------------------------------------------- card


def test_dry_run_card_matches_golden(converted, tmp_path, capsys):
    ckpt = _checkpoint_copy(converted, tmp_path)
    (ckpt / "LICENSE").write_text(APACHE)
    assert main(["push", str(ckpt), "someone/tiny-dlm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listing, card = out.split("----- README.md -----\n", 1)
    card = card.rstrip("\n") + "\n"
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(card)
    assert card == GOLDEN.read_text()
    assert str(tmp_path) not in out
    # every file with its size, the card as README.md
    sizes = {p.name: p.stat().st_size for p in ckpt.iterdir() if not p.name.startswith(".")}  # marker: not uploaded
    sizes["README.md"] = len(card.encode())
    rows = [ln.split() for ln in listing.splitlines()[1:] if ln.strip() and "total" not in ln]
    assert {r[1]: int(r[0].replace(",", "")) for r in rows} == sizes
    meta, body = _card_parts(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"diffusion", "masked-diffusion", "dlm-adapt"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0" and "base_model" not in meta  # the source is a local directory
    assert "not an autoregressive" in body
    # the usage snippet runs as written, with transformers alone, against the checkpoint's files
    snippet = body.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'AutoModel.from_pretrained("someone/tiny-dlm", trust_remote_code=True)' in snippet
    namespace = {"print": lambda *a: namespace.setdefault("printed", a)}
    exec(snippet.replace('"someone/tiny-dlm"', repr(str(ckpt))), namespace)
    assert namespace["out"].shape[1] <= namespace["ids"].shape[1] + 32 and isinstance(namespace["printed"][0], str)


def test_card_from_a_hub_source_names_base_model_license_and_is_rewritten_in_place(converted, tmp_path):
    ckpt = _checkpoint_copy(converted, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["provenance"]["source"] = "HuggingFaceTB/SmolLM2-135M"
    config["provenance"]["source_from_hub"] = True
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "LICENSE").write_text("MIT License\n\nPermission is hereby granted, free of charge, ...")
    old = f"---\nlanguage: en\nlicense: other\n---\n# My model\n\nMy words.\n\n{BEGIN}\nstale numbers\n{END}\n\nMore.\n"
    (ckpt / "README.md").write_text(old)
    card = adapt.push_to_hub(ckpt, "someone/x", dry_run=True).card
    meta, body = _card_parts(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert meta["language"] == "en" and meta["license"] == "other"  # the user's own values stay
    assert body.startswith("# My model\n\nMy words.\n\n" + BEGIN) and body.rstrip().endswith("More.")
    assert body.count(BEGIN) == 1 and "stale numbers" not in body
    assert "`HuggingFaceTB/SmolLM2-135M`" in body
    assert (ckpt / "README.md").read_text() == old


@pytest.mark.parametrize("source, from_hub, base", [
    ("src", False, None),  # a relative path, typed in another directory: not a Hub id
    ("models/src", False, None),
    ("someorg/tiny", True, "someorg/tiny"),
    ("src", None, None),  # recorded by an older dlm-adapt (no source_from_hub): only namespace/name counts
    ("someorg/tiny", None, "someorg/tiny"),
])
def test_base_model_is_only_a_source_resolved_from_the_hub(converted, tmp_path, source, from_hub, base):
    ckpt = _checkpoint_copy(converted, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["provenance"]["source"] = source
    if from_hub is None:
        del config["provenance"]["source_from_hub"]
    else:
        config["provenance"]["source_from_hub"] = from_hub
    (ckpt / "config.json").write_text(json.dumps(config))
    meta, body = _card_parts(adapt.push_to_hub(ckpt, "someone/x", dry_run=True).card)
    assert meta.get("base_model") == base
    assert (f"`{source}`" if base else f"`{Path(source).name}` (a local directory)") in body


@pytest.mark.parametrize("path, recorded, base", [
    ("src", "/home/me/src", None),  # a relative model.path: the run's marker holds it made absolute
    ("someorg/tiny", "someorg/tiny", "someorg/tiny"),  # not a path at training time: loaded from the Hub
    ("src", None, None),  # no record (an older run): a bare name may as well be a local directory
])
def test_training_model_path_is_base_model_only_when_it_came_from_the_hub(converted, tmp_path, path, recorded, base):
    run = tmp_path / "run"
    ckpt = _checkpoint_copy(converted, run, "final")
    (run / "config.json").write_text(json.dumps({"max_steps": 2, "train": {}, "anneal": {}, "model": {"path": path}}))
    write_marker(run, "train", **({"model": {"path": recorded}} if recorded else {}))
    meta, _ = _card_parts(adapt.push_to_hub(ckpt, "someone/x", dry_run=True).card)
    assert meta.get("base_model") == base


def test_convert_records_where_the_source_came_from(tmp_path, monkeypatch):
    save_tiny_source(tmp_path / "src", "llama")
    (tmp_path / "outside.txt").write_text("hf_secret")
    (tmp_path / "src" / "LICENSE").symlink_to(tmp_path / "outside.txt")  # a link out of the source: not copied
    (tmp_path / "src" / "LICENSE-MIT").write_text("MIT License")
    monkeypatch.chdir(tmp_path)
    local = adapt.convert("src", tmp_path / "local")
    assert json.loads((local / "config.json").read_text())["provenance"]["source_from_hub"] is False
    assert not (local / "LICENSE").exists() and (local / "LICENSE-MIT").read_text() == "MIT License"
    assert "base_model" not in _card_parts(adapt.push_to_hub(local, "someone/x", dry_run=True).card)[0]
    # a Hub download: a snapshot whose files are links into the cache's blob store, beside it
    snapshot = tmp_path / "cache" / "models--someorg--tiny" / "snapshots" / "abc"
    blobs = tmp_path / "cache" / "models--someorg--tiny" / "blobs"
    shutil.copytree(tmp_path / "src", blobs, ignore=shutil.ignore_patterns("LICENSE"))
    snapshot.mkdir(parents=True)
    for f in blobs.iterdir():
        (snapshot / f.name).symlink_to(f)
    monkeypatch.setattr("adapt.sources._download", lambda *a: snapshot)
    hub = adapt.convert("someorg/tiny", tmp_path / "hub")
    assert json.loads((hub / "config.json").read_text())["provenance"]["source_from_hub"] is True
    assert (hub / "LICENSE-MIT").read_text() == "MIT License"
    assert _card_parts(adapt.push_to_hub(hub, "someone/x", dry_run=True).card)[0]["base_model"] == "someorg/tiny"


def test_links_inside_dir_are_pushed_as_files(converted, tmp_path):
    ckpt = _checkpoint_copy(converted, tmp_path)
    (ckpt / "extra").mkdir()
    (ckpt / "extra" / "config-copy.json").symlink_to(Path("..") / "config.json")
    files = dict(adapt.push_to_hub(ckpt, "someone/x", dry_run=True).files)
    assert files["extra/config-copy.json"] == (ckpt / "config.json").stat().st_size


def _train_setup(root: Path):
    save_tiny_source(root / "causal", "llama")
    write_word_runs(root / "train.txt", 200)
    (root / "recipe.yaml").write_text(yaml.safe_dump({
        "max_steps": 4, "eval_steps": 2, "save_steps": 0,
        "model": {"path": str(root / "causal"), "attn_implementation": "eager"},
        "data": {"train": str(root / "train.txt"), "seq_length": 16, "max_eval_sequences": 4},
        "anneal": {"anneal_steps": 2}, "train": {"batch_size": 4, "gradient_accumulation_steps": 2, "lr": 3e-3}}))


def test_card_after_train_summarises_the_run(tmp_path, capsys):
    _train_setup(tmp_path)
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "recipe.yaml"), f"output_dir={out}"]) == 0
    capsys.readouterr()
    assert main(["push", str(out / "final"), "me/tiny-adapted", "--dry-run"]) == 0
    card = capsys.readouterr().out.split("----- README.md -----\n", 1)[1]
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    elbo = [m for m in metrics if "val_elbo" in m][-1]
    assert "## Adaptation training" in card and "No training record" not in card
    assert "| steps | 4 optimizer steps |" in card
    assert "512 per process (4 steps × 4 sequences × 2 accumulation × 16 tokens)" in card
    assert "annealed from causal to bidirectional over 2 steps" in card
    assert f"{elbo['val_elbo']:.4f} nats/token at step 4" in card
    assert "`train.txt` (local file)" in card and "full fine-tuning" in card
    assert "`llama` from `causal` (a local directory)" in card
    assert str(tmp_path) not in card


# ---------------------------------------------------------------- refusals


def _causal(p):
    save_tiny_source(p, "llama")


def _drop(name):
    return lambda p, dlm: (shutil.copytree(dlm, p), (p / name).unlink())


def _truncate(p, dlm):
    shutil.copytree(dlm, p)
    f = p / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _adapter_of_causal(p, dlm):
    p.mkdir()
    save_tiny_source(p.parent / "causal-base", "llama")
    (p / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path":
                                                       str(p.parent / "causal-base")}))
    shutil.copy(dlm / "model.safetensors", p / "adapter_model.safetensors")


REFUSED = {
    "missing path": (None, "does not exist"),
    "empty dir": (lambda p, dlm: p.mkdir(), "has no config.json"),
    "a file": (lambda p, dlm: p.write_text("x"), "is not a directory"),
    "training checkpoint": (lambda p, dlm: (p.mkdir(), (p / "state.json").write_text("{}"),
                                            shutil.copy(dlm / "model.safetensors", p / "trainable.safetensors")),
                            "has no config.json"),
    "causal model dir": (lambda p, dlm: _causal(p), "is a 'llama' checkpoint, not a dlm-adapt"),
    "no remote code": (_drop("modeling_masked_diffusion.py"), "lacks the remote code file modeling_masked"),
    "no weights": (_drop("model.safetensors"), "has no model.safetensors"),
    "truncated weights": (_truncate, "corrupt or truncated"),
    "no tokenizer": (_drop("tokenizer.json"), "tokenizer"),
    "no generation config": (_drop("generation_config.json"), "no generation_config.json"),
    "adapter-only on a full checkpoint": (lambda p, dlm: shutil.copytree(dlm, p), "is not a PEFT adapter"),
    "adapter of a causal model": (_adapter_of_causal, "its base .* is not a usable dlm-adapt checkpoint"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_not_a_checkpoint_is_refused(converted, tmp_path, capsys, case):
    make, message = REFUSED[case]
    target = tmp_path / "dir"
    if make is not None:
        make(target, converted("llama")[1])
    before = _snapshot(tmp_path)
    capsys.readouterr()  # progress bars of building the fixture
    extra = ["--adapter-only"] if case == "adapter-only on a full checkpoint" else []
    assert main(["push", str(target), "me/x", "--dry-run", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dlm-adapt: error: "), err
    assert re.search(message, err[0]), err[0]
    assert _snapshot(tmp_path) == before


def test_invalid_repo_id_is_refused(converted):
    with pytest.raises(AdaptError, match="invalid repo id"):
        adapt.push_to_hub(converted("llama")[1], "a/b/c", dry_run=True)


# ---------------------------------------------------------------- uploads


@pytest.mark.slow
def test_push_uploads_dir_byte_for_byte_with_the_card(converted, tmp_path, hub, online):
    ckpt = _checkpoint_copy(converted, tmp_path)
    (ckpt / "extra").mkdir()
    (ckpt / "extra" / "notes.txt").write_text("kept as is\n")
    (ckpt / ".cache").mkdir()
    (ckpt / ".cache" / "junk").write_text("not uploaded")
    (ckpt / "README.md").write_text("---\nlicense: mit\ntags:\n- custom\n---\n# Tiny\n\nMy own words.\n")
    before = _snapshot(ckpt)

    options = ["--private", "--revision", "exp", "--commit-message", "first"]
    dry = online(hub.url, ckpt, "me/tiny", *options, "--dry-run", token=None)
    assert dry.returncode == 0, dry.stderr
    assert hub.requests == []  # a dry run contacts nothing (and needs no token)

    proc = _push(tmp_path, hub.url, ckpt, "me/tiny", *options)  # a fresh process, as a user runs it
    assert proc.returncode == 0, proc.stderr
    assert f"pushed {7 + len(CODE_FILES)} files" in proc.stdout  # the remote code, and 7 more
    assert hub.repos["me/tiny"]["visibility"] == "private"
    assert hub.commits == [("me/tiny", "exp", {"summary": "first", "description": ""})]
    uploaded = hub.files("me/tiny", "exp")
    card = uploaded.pop("README.md").decode()
    expected = _expected_upload(ckpt)
    expected.pop(".cache/junk")
    assert uploaded == expected  # byte for byte
    assert hub.files("me/tiny", "main") == {}
    assert card == dry.stdout.split("----- README.md -----\n", 1)[1].rstrip("\n") + "\n"
    meta, body = _card_parts(card)
    assert meta["license"] == "mit" and meta["library_name"] == "transformers"
    assert meta["tags"][:1] == ["custom"] and {"diffusion", "masked-diffusion", "dlm-adapt"} <= set(meta["tags"])
    assert body.startswith("# Tiny\n") and "My own words." in body
    assert 'trust_remote_code=True, revision="exp")' in body
    # the token went out as the credential and nowhere else
    assert _all_authenticated(hub)
    assert not any(TOKEN.encode() in r[3] for r in hub.requests)
    assert _snapshot(ckpt) == before


def test_a_failed_commit_is_retried(converted, tmp_path, hub, online):
    ckpt = _checkpoint_copy(converted, tmp_path)
    hub.fail_commits = 1
    proc = online(hub.url, ckpt, "me/tiny")
    assert proc.returncode == 0, proc.stderr
    assert "commit attempt 1 failed (HTTP 500); retrying" in proc.stderr
    assert sum(1 for r in hub.requests if r[1].endswith("/commit/main")) == 2
    uploaded = hub.files("me/tiny")
    assert uploaded.pop("README.md").startswith(b"---\n") and uploaded == _expected_upload(ckpt)


def test_persistent_server_error_is_one_clear_error_and_a_rerun_completes(converted, tmp_path, hub, online):
    ckpt = _checkpoint_copy(converted, tmp_path)
    before = _snapshot(ckpt)
    hub.fail_commits = 10
    proc = online(hub.url, ckpt, "me/tiny")
    line = _error_line(proc)
    assert "HTTP 500" in line and "no commit was made" in line and "run the same command again" in line
    assert hub.files("me/tiny") == {} and _snapshot(ckpt) == before
    assert sum(1 for r in hub.requests if r[1].endswith("/commit/main")) == 3  # the first try and two retries
    hub.fail_commits = 0
    again = online(hub.url, ckpt, "me/tiny")
    assert again.returncode == 0, again.stderr
    uploaded = hub.files("me/tiny")
    uploaded.pop("README.md")
    assert uploaded == _expected_upload(ckpt)


def test_rejected_token_is_reported_without_echoing_it(converted, tmp_path, hub, online):
    ckpt = _checkpoint_copy(converted, tmp_path)
    before = _snapshot(ckpt)
    hub.reject_auth = True
    proc = online(hub.url, ckpt, "me/tiny")  # it asserts the token is not in stdout/stderr (read at the fds)
    line = _error_line(proc)
    assert "token" in line and "401" in line and "HF_TOKEN" in line
    assert _all_authenticated(hub)
    assert hub.repos == {} and _snapshot(ckpt) == before


def test_unreachable_hub_is_one_clear_error_and_a_rerun_completes(converted, tmp_path, hub, online):
    ckpt = _checkpoint_copy(converted, tmp_path)
    before = _snapshot(ckpt)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    proc = online(closed, ckpt, "me/tiny")
    line = _error_line(proc)
    assert "cannot reach the Hugging Face Hub" in line and "run the same command again" in line
    assert _snapshot(ckpt) == before
    again = online(hub.url, ckpt, "me/tiny")
    assert again.returncode == 0, again.stderr
    assert set(hub.files("me/tiny")) == set(_expected_upload(ckpt)) | {"README.md"}


def test_missing_token_contacts_nothing(converted, hub, online):
    proc = online(hub.url, converted("llama")[1], "me/tiny", token=None)
    assert "no Hugging Face token" in _error_line(proc)
    assert hub.requests == []


def test_adapter_push(tmp_path, hub, online, capfd):
    _train_setup(tmp_path)
    out = tmp_path / "run"
    cfg = load_config(tmp_path / "recipe.yaml", [f"output_dir={out}", "train.method=lora",
                                                 "lora.save_adapter_only=true", "max_steps=2"])
    final = adapt.train(cfg)
    assert (final / "tokenizer.json").exists() and (final / "README.md").exists()  # more than the adapter

    # without --adapter-only the whole directory goes, tokenizer included
    capfd.readouterr()
    assert main(["push", str(final), "me/ada", "--dry-run"]) == 0
    assert "tokenizer.json" in capfd.readouterr().out

    proc = online(hub.url, final, "me/ada", "--adapter-only")
    assert proc.returncode == 0, proc.stderr
    uploaded = hub.files("me/ada")
    card = uploaded.pop("README.md").decode()
    assert uploaded == {n: (final / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    meta, body = _card_parts(card)
    assert meta["library_name"] == "peft" and "lora" in meta["tags"] and "dlm-adapt" in meta["tags"]
    # PEFT's own card named the local base path: neither that nor its derived tag survives
    assert "base_model" not in meta and not any(t.startswith("base_model:") for t in meta["tags"])
    assert "Model Card for Model ID" in body and "PeftModel.from_pretrained(base, \"me/ada\")" in body
    assert "## Adaptation training" in body and "LoRA, r 16" in body and "2 optimizer steps" in body
