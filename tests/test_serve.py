"""`dlm-adapt serve`: a real uvicorn server on 127.0.0.1 (a free port), spoken to with the official `openai` client
and with raw HTTP. The server's greedy text is `adapt.generate`'s (the function `dlm-adapt generate` calls),
streamed pieces concatenate to it, concurrent requests are batched and each gets what it gets alone, and every bad
request is one OpenAI-style error JSON with the right status while the server keeps serving."""

import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import require_shared

pytest.importorskip("fastapi", reason="serving needs the serve extra (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="serving needs the serve extra (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="the tests speak to the server with the openai client (dev extra)")

import adapt  # noqa: E402
from adapt.errors import AdaptError  # noqa: E402
from adapt.config import SamplingOptions  # noqa: E402
from adapt.sampling.generate import check_options  # noqa: E402
from adapt.serving.app import build_server  # noqa: E402

KEY = "test-key"
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
PROMPTS = ["Once upon a time", "The cat", "Lily and Tom went", "One day, a little bird", "The sun was",
           "Max had a red ball", "In the park", "A big dog", "Sam liked to", "There was a tree", "Mom said",
           "The little girl", "It was a sunny day", "Ben found a box", "The fish", "At night"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server started in a thread of this process (its model in memory for `adapt.generate` to compare)."""

    def __init__(self, model, **options):
        self.port = _free_port()
        self.server = build_server(model, port=self.port, log_level="warning", **options)
        self.model, self.tokenizer = self.server.batcher.model, self.server.batcher.tokenizer
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY, max_retries=0)

    def raw(self, method, path, body=None, headers=None):
        """(status, parsed JSON body) of one HTTP request; `body` bytes are sent as they are."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        sent = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers={k: v for k, v in sent.items() if v is not None})
        response = conn.getresponse()
        status, data = response.status, response.read()
        conn.close()
        return status, json.loads(data)

    def health(self) -> dict:
        return self.raw("GET", "/health")[1]["batching"]

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    """A converted stories260K block checkpoint (block size 4), served with an API key and a chat template."""
    source = require_shared()
    root = tmp_path_factory.mktemp("serve")
    adapt.convert(source, root / "stories-block", block_size=4)
    (root / "chat.jinja").write_text(TEMPLATE)
    running = Running(root / "stories-block", api_key=KEY, chat_template=str(root / "chat.jinja"),
                      max_batch_size=16, batch_wait_ms=100)
    running.path = root / "stories-block"
    yield running
    running.stop()


def _generate(running, prompt, **options):
    return adapt.generate(running.model, [prompt], tokenizer=running.tokenizer, **options)[0]


def test_completion_and_chat_equal_generate(stories):
    c = stories.client
    for extra in ({}, {"threshold": 0.6}, {"steps": 8, "remasking": "margin"}):
        r = c.completions.create(model="stories-block", prompt=PROMPTS[0], max_tokens=24, extra_body=extra)
        expected = _generate(stories, PROMPTS[0], max_new_tokens=24, **extra)
        assert r.choices[0].text == expected["text"] and r.choices[0].text
        assert r.usage.prompt_tokens == len(stories.tokenizer(PROMPTS[0]).input_ids)
        assert r.usage.completion_tokens == len(expected["tokens"])
        assert r.model_extra["dlm_adapt"]["nfe"] == expected["nfe"]
    r = c.chat.completions.create(model="stories-block", messages=[{"role": "user", "content": "Tell a story"}],
                                  max_tokens=16)
    assert r.choices[0].message.content == _generate(stories, "Tell a story", chat=True, max_new_tokens=16)["text"]
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in c.models.list()] == ["stories-block"]


def test_stop_strings_cut_the_text_where_generate_s_text_has_them(stories):
    full = _generate(stories, PROMPTS[0], max_new_tokens=24)["text"]
    stop = full.split()[3]
    r = stories.client.completions.create(model="stories-block", prompt=PROMPTS[0], max_tokens=24, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_streamed_pieces_concatenate_to_the_text(stories):
    c = stories.client
    whole = c.completions.create(model="stories-block", prompt=PROMPTS[2], max_tokens=24).choices[0].text
    chunks = list(c.completions.create(model="stories-block", prompt=PROMPTS[2], max_tokens=24, stream=True))
    pieces = [ch.choices[0].text for ch in chunks]
    assert "".join(pieces) == whole and len([p for p in pieces if p]) > 1  # one event per finished block
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    messages = [{"role": "user", "content": "Tell a story"}]
    whole = c.chat.completions.create(model="stories-block", messages=messages, max_tokens=16).choices[0].message
    chunks = list(c.chat.completions.create(model="stories-block", messages=messages, max_tokens=16, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.content
    # the wire format: data: lines, a last chunk with finish_reason, then [DONE]
    conn = http.client.HTTPConnection("127.0.0.1", stories.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(dict(model="stories-block", prompt="Hi", max_tokens=8,
                                                            stream=True)),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    events = [e for e in conn.getresponse().read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_concurrent_requests_are_batched_and_get_what_they_get_alone(stories):
    c = stories.client
    alone = [c.completions.create(model="stories-block", prompt=p, max_tokens=16).choices[0].text for p in PROMPTS]
    before = stories.health()
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: c.completions.create(model="stories-block", prompt=p, max_tokens=16),
                                 PROMPTS))
    assert [r.choices[0].text for r in together] == alone
    after = stories.health()
    assert after["requests_served"] - before["requests_served"] == len(PROMPTS)
    assert after["batches"] - before["batches"] < len(PROMPTS)  # some requests shared a batch
    assert after["batched_requests"] > before["batched_requests"] and after["max_batch_size_seen"] > 1
    assert max(r.model_extra["dlm_adapt"]["batch_size"] for r in together) > 1


def _cli_error(**options) -> str:
    """The words `dlm-adapt generate` prints for these options (after `dlm-adapt: error: `)."""
    with pytest.raises(AdaptError) as e:
        check_options(STORIES_PATH[0], ["x"], SamplingOptions(**options))
    return str(e.value)


STORIES_PATH = []
GOOD = {"model": "stories-block", "prompt": "Once upon a time", "max_tokens": 8}
CHAT = {"model": "stories-block", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
BAD = [  # (name, path, body, headers, status, the error's param or None, CLI options whose error words it repeats)
    ("invalid JSON", "/v1/completions", b'{"model": ', None, 400, None, None),
    ("not an object", "/v1/completions", b"[1, 2]", None, 400, None, None),
    ("max_tokens a string", "/v1/completions", dict(GOOD, max_tokens="8"), None, 400, "max_tokens", None),
    ("negative max_tokens", "/v1/completions", dict(GOOD, max_tokens=-3), None, 400, "max_tokens", None),
    ("max_tokens 0", "/v1/completions", dict(GOOD, max_tokens=0), None, 400, "max_tokens", None),
    ("max_tokens past the context", "/v1/completions", dict(GOOD, max_tokens=100000), None, 400, "max_tokens",
     None),
    ("huge n", "/v1/completions", dict(GOOD, n=1000), None, 400, "n", None),
    ("n a boolean", "/v1/completions", dict(GOOD, n=True), None, 400, "n", None),
    ("unknown model", "/v1/completions", dict(GOOD, model="gpt-4"), None, 404, "model", None),
    ("missing model", "/v1/completions", {"prompt": "Hi"}, None, 400, "model", None),
    ("missing prompt", "/v1/completions", {"model": "stories-block"}, None, 400, "prompt", None),
    ("two prompts", "/v1/completions", dict(GOOD, prompt=["a", "b"]), None, 400, "prompt", None),
    ("prompt over the context", "/v1/completions", dict(GOOD, prompt="the cat sat " * 400), None, 400, "prompt",
     None),
    ("missing messages", "/v1/chat/completions", {"model": "stories-block"}, None, 400, "messages", None),
    ("empty messages", "/v1/chat/completions", dict(CHAT, messages=[]), None, 400, "messages", None),
    ("messages a string", "/v1/chat/completions", dict(CHAT, messages="Hi"), None, 400, "messages", None),
    ("unknown role", "/v1/chat/completions", dict(CHAT, messages=[{"role": "wizard", "content": "Hi"}]), None,
     400, "messages.0.role", None),
    ("negative temperature", "/v1/completions", dict(GOOD, temperature=-1.0), None, 400, None,
     {"temperature": -1.0}),
    ("top_p above 1", "/v1/completions", dict(GOOD, top_p=2.0), None, 400, None, {"top_p": 2.0}),
    ("steps 0", "/v1/completions", dict(GOOD, steps=0), None, 400, None, {"steps": 0, "max_new_tokens": 8}),
    ("unknown remasking", "/v1/completions", dict(GOOD, remasking="bogus"), None, 400, None,
     {"remasking": "bogus"}),
    ("threshold above 1", "/v1/completions", dict(GOOD, threshold=1.5), None, 400, None, {"threshold": 1.5}),
    ("two commit rules", "/v1/completions", dict(GOOD, threshold=0.5, entropy_bound=1.0), None, 400, None,
     {"threshold": 0.5, "entropy_bound": 1.0}),
    ("block_length on a block checkpoint", "/v1/completions", dict(GOOD, block_length=8), None, 400, None,
     {"block_length": 8}),
    ("draft_length without speculative", "/v1/completions", dict(GOOD, draft_length=2), None, 400, None,
     {"draft_length": 2}),
    # 5 prompt tokens + 500 fit 512 positions, but a speculative round drafts up to 2 x 4 + 2 positions ahead
    ("speculative drafts past the context", "/v1/completions", dict(GOOD, max_tokens=500, speculative=True), None,
     400, "max_tokens", None),
    ("stream a string", "/v1/completions", dict(GOOD, stream="yes"), None, 400, "stream", None),
    ("five stop strings", "/v1/completions", dict(GOOD, stop=list("abcde")), None, 400, "stop", None),
    ("logprobs", "/v1/completions", dict(GOOD, logprobs=5), None, 400, "logprobs", None),
    ("wrong API key", "/v1/completions", GOOD, {"Authorization": "Bearer nope"}, 401, None, None),
    ("missing API key", "/v1/completions", GOOD, {"Authorization": None}, 401, None, None),
    ("unknown route", "/v1/embeddings", GOOD, None, 404, None, None),
]


def test_bad_requests_get_one_error_json_with_the_right_status_and_the_server_still_serves(stories):
    """One test, so that the good request after the table runs on the same server (xdist spreads tests)."""
    STORIES_PATH[:] = [stories.path]
    assert len(BAD) >= 20
    for name, path, body, headers, status, param, cli in BAD:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, answer = stories.raw("POST", path, raw, headers)
        assert got == status, (name, answer)
        assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}, name
        assert answer["error"]["message"], name
        if param is not None:
            assert answer["error"]["param"] == param, (name, answer)
        if cli is not None:  # the same words as the command line's error
            assert answer["error"]["message"] == _cli_error(**cli), name
    batcher = stories.server.batcher
    limit, batcher.max_queue = batcher.max_queue, 0  # a full queue
    try:
        status, answer = stories.raw("POST", "/v1/completions", json.dumps(GOOD).encode())
    finally:
        batcher.max_queue = limit
    assert status == 429 and answer["error"]["type"] == "rate_limit_error"
    r = stories.client.completions.create(model="stories-block", prompt=PROMPTS[0], max_tokens=24)
    assert r.choices[0].text == _generate(stories, PROMPTS[0], max_new_tokens=24)["text"]
    assert stories.health()["requests_failed"] == 0


def test_a_client_that_disconnects_mid_stream_frees_its_row(stories):
    long = dict(model="stories-block", prompt="Once", max_tokens=256, min_tokens=256, stream=True)
    started = time.monotonic()
    stories.client.completions.create(model="stories-block", prompt="Once", max_tokens=256,
                                      extra_body={"min_tokens": 256})
    full = time.monotonic() - started
    before = stories.health()
    conn = http.client.HTTPConnection("127.0.0.1", stories.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(long),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.read(6) == b"data: "  # decoding has begun
    left = time.monotonic()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    while stories.health()["running"] or stories.health()["requests_cancelled"] == before["requests_cancelled"]:
        assert time.monotonic() - left < full, "the row kept decoding after its client left"
        time.sleep(0.02)
    assert time.monotonic() - left < full / 2
    assert stories.health()["requests_served"] == before["requests_served"]


def test_python_api_with_a_loaded_tiny_model(converted):
    """`build_server` takes a loaded model and tokenizer (no ../shared needed); no key: no auth."""
    _, path = converted("llama")
    model, tokenizer = adapt.load(path)
    running = Running(model, tokenizer=tokenizer, model_name="tiny")
    try:
        r = running.client.completions.create(model="tiny", prompt="a b c", max_tokens=6, extra_body={"steps": 3})
        assert r.choices[0].text == adapt.generate(model, ["a b c"], tokenizer=tokenizer, max_new_tokens=6,
                                                   steps=3)[0]["text"]
        status, answer = running.raw("POST", "/v1/chat/completions", json.dumps(dict(
            model="tiny", messages=[{"role": "user", "content": "a"}])).encode())
        assert status == 400 and answer["error"]["code"] == "no_chat_template"
        with pytest.raises(AdaptError, match="cannot listen on 127.0.0.1"):  # one line, before a model loads
            build_server(model, tokenizer=tokenizer, port=running.port)
    finally:
        running.stop()


def test_sigterm_stops_accepting_and_exits_0(stories):
    """The command line's server: SIGTERM while a request decodes; the process exits 0 within the shutdown
    timeout."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    process = subprocess.Popen([sys.executable, "-m", "adapt", "serve", str(stories.path), "--port", str(port),
                                "--shutdown-timeout", "3", "--log-level", "warning"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stderr.read().decode()
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/health")
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert client.completions.create(model="stories-block", prompt="Once", max_tokens=8).choices[0].text
        stream = client.completions.create(model="stories-block", prompt="Once", max_tokens=480, stream=True,
                                           extra_body={"min_tokens": 480})
        next(iter(stream))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, process.stderr.read().decode()
        with pytest.raises(openai.APIConnectionError):
            client.completions.create(model="stories-block", prompt="Once", max_tokens=8)
    finally:
        if process.poll() is None:
            process.kill()
