"""`dlm-adapt serve` / `adapt.serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for a dlm-adapt checkpoint.

Routes: POST /v1/completions, POST /v1/chat/completions (server-sent events with `stream: true`), GET /v1/models,
GET /health. Decoding happens in `batching.Batcher`'s worker thread; handlers only queue jobs and await their events.
Request texts, generated texts and the API key are never logged."""

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path

from ..config.commands import SamplingOptions, ServeOptions
from ..errors import AdaptError
from .batching import Batcher, Closed, Job, QueueFull
from .protocol import APIError, ChatRequest, CompletionRequest, chat_text, check_request, max_new_tokens, parse, \
    sampling_options

log = logging.getLogger("adapt.serving")


def serve(model, *, tokenizer=None, **options):
    """Serve `model` (a checkpoint path, or a loaded model with its `tokenizer`) until Ctrl-C / SIGTERM; options are
    `ServeOptions`' fields. On a signal it stops accepting, lets running requests finish for --shutdown-timeout
    seconds, cancels what is left, and returns."""
    server = build_server(model, tokenizer=tokenizer, **options)
    log.info("serving %s on http://%s:%d/v1", server.served_name, server.config.host, server.config.port)
    server.run()


def build_server(model, *, tokenizer=None, **options):
    """The uvicorn server `serve` runs (`.run()` blocks; `.should_exit = True` stops it), its model loaded."""
    o = ServeOptions(**options)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise AdaptError(f"serving needs the serve extra ({e.name} is missing): pip install 'dlm-adapt[serve]'") \
            from None
    _check_address(o.host, o.port)  # before the model loads
    path = model if isinstance(model, (str, Path)) else None
    if path is not None:
        from ..checkpoint import load

        model, tokenizer = load(path)
    if tokenizer is None:
        raise AdaptError("pass the tokenizer with the model")
    if o.chat_template is not None:
        tokenizer.chat_template = Path(o.chat_template).read_text(encoding="utf-8")
    name = o.model_name or (Path(path).name if path is not None else "dlm-adapt")
    app = create_app(model, tokenizer, o, name)
    config = uvicorn.Config(app, host=o.host, port=o.port, log_level=o.log_level,
                            timeout_graceful_shutdown=o.shutdown_timeout, access_log=o.log_level == "debug")
    server = _server(config)
    server.served_name, server.batcher = name, app.state.batcher
    return server


def _check_address(host: str, port: int):
    """One line for an address in use (or not this machine's), instead of uvicorn's log after the model loaded."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise AdaptError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port or --host") from None


def _server(config):
    """uvicorn's Server, except that a signal ends `run()` normally (exit status 0: a requested stop is not a
    failure; uvicorn itself raises the signal again once it has shut down) and stops the batcher taking jobs."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

        def handle_exit(self, sig, frame):
            self.batcher.stop_accepting()
            super().handle_exit(sig, frame)

    return Server(config)


def create_app(model, tokenizer, options: ServeOptions, name: str):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        app.state.batcher.close(options.shutdown_timeout)

    app = FastAPI(title="dlm-adapt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = Batcher(model, tokenizer, max_batch_size=options.max_batch_size, max_queue=options.max_queue,
                                batch_wait=options.batch_wait_ms / 1000)
    key = options.api_key or os.environ.get("DLM_ADAPT_API_KEY")
    started = time.time()
    app.state.served = _Served(model, tokenizer, options, name, app.state.batcher)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown route, wrong method
        return JSONResponse(APIError(e.status_code, str(e.detail), code=None).body(), status_code=e.status_code)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return JSONResponse(APIError(401, "invalid or missing API key: send Authorization: Bearer <key>",
                                             type="authentication_error", code="invalid_api_key").body(),
                                    status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "uptime_s": round(time.time() - started, 1),
                "batching": dict(app.state.batcher.stats, max_batch_size=options.max_batch_size)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(started),
                                            "owned_by": "dlm-adapt"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(app.state.served, request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(app.state.served, request, ChatRequest, chat=True)

    return app


@dataclasses.dataclass
class _Served:
    """What a request handler needs: the model, its name, the server's options, the batcher."""

    model: object
    tokenizer: object
    options: ServeOptions
    name: str
    batcher: Batcher


async def _complete(served: _Served, request, cls, chat: bool):
    """One completion: parse and check the body, queue the job, answer with its result or its events."""
    from fastapi.responses import JSONResponse, StreamingResponse

    model, tokenizer, name, options = served.model, served.tokenizer, served.name, served.options
    body = parse(await request.body(), cls)
    if body.model != name:
        raise APIError(404, f"model {body.model!r} is not served here; this server serves {name!r}",
                       param="model", code="model_not_found")
    sampling = sampling_options(body)
    n = check_request(model, body, sampling)  # the loaded model's config: no file read per request
    ids = _prompt_ids(tokenizer, body, chat)
    _check_context(model, ids, n, sampling, _context_length(model))
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    job = Job(ids, n, sampling, body.seed, stops, asyncio.get_running_loop())
    try:
        served.batcher.submit(job)
    except QueueFull:
        raise APIError(429, f"the server's queue is full ({options.max_queue} requests waiting); retry later",
                       type="rate_limit_error", code="queue_full") from None
    except Closed:
        raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
    head = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", created=int(time.time()), model=name)
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(request, job, head, chat, include_usage), media_type="text/event-stream")
    try:
        while True:
            kind, value = await _next_event(request, job)
            if kind == "gone":  # nobody reads the answer
                return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
            if kind == "done":
                return _response(head, chat, value)
            if kind == "error":
                raise APIError(value[0], value[1], type="server_error" if value[0] >= 500 else
                               "invalid_request_error")
    finally:
        job.cancelled = True  # done already, or the client left: the worker drops the row either way


async def _next_event(request, job: Job):
    """The job's next event; meanwhile, a client that disconnects cancels the job (its row leaves the batch)."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled = True
                return "gone", None


async def _sse(request, job: Job, head: dict, chat: bool, include_usage: bool):
    """OpenAI's server-sent events: a chunk per finished block's text, a last chunk with finish_reason, [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text=None, finish=None, usage=None):
        if chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        event = dict(head, object=kind, choices=[] if usage else [choice])
        if usage:
            event["usage"] = usage
        return f"data: {json.dumps(event)}\n\n"

    try:
        if chat:
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            yield f"data: {json.dumps(dict(head, object=kind, choices=[role]))}\n\n"
        while True:
            event, value = await _next_event(request, job)
            if event == "gone":
                return
            if event == "delta":
                yield chunk(value)
            elif event == "error":
                yield f"data: {json.dumps(APIError(value[0], value[1], type='server_error').body())}\n\n"
                break
            else:
                yield chunk(finish=value["finish_reason"])
                if include_usage:
                    yield chunk(usage=_usage(value))
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True


def _usage(result: dict) -> dict:
    p, c = result["prompt_tokens"], result["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _response(head: dict, chat: bool, result: dict) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result["text"]},
                  "finish_reason": result["finish_reason"], "logprobs": None}
    else:
        choice = {"index": 0, "text": result["text"], "finish_reason": result["finish_reason"], "logprobs": None}
    stats = {k: result[k] for k in ("nfe", "tokens_per_forward", "batch_size")}
    return dict(head, object="chat.completion" if chat else "text_completion", choices=[choice],
                usage=_usage(result), dlm_adapt=stats)


def _prompt_ids(tokenizer, body, chat: bool) -> list[int]:
    """The prompt's ids, as `dlm-adapt generate` makes them (a chat template's text carries its own special
    tokens). A prompt holding the mask token is refused: the server continues text, it does not infill."""
    if chat:
        ids = tokenizer(chat_text(tokenizer, body.messages), add_special_tokens=False).input_ids
    else:
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: give one prompt per request (got a list of {len(prompt)})",
                               param="prompt", code="unsupported")
            prompt = prompt[0]
        ids = tokenizer(prompt, add_special_tokens=True).input_ids
    if not ids:
        raise APIError(400, "the prompt is empty (no tokens)", param="messages" if chat else "prompt",
                       code="invalid_value")
    if tokenizer.mask_token_id is not None and tokenizer.mask_token_id in ids:
        raise APIError(400, f"the prompt contains the mask token {tokenizer.mask_token}: the server continues text "
                       "and does not infill; use `dlm-adapt generate --infill`", param="prompt", code="invalid_value")
    return ids


def _context_length(model) -> int | None:
    text = getattr(model.config, "text_config", None)
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)


def _check_context(model, ids: list[int], n: int | None, sampling: SamplingOptions, context: int | None):
    """A prompt plus its new tokens must fit the model's positions (rounded up to whole blocks for block decoding,
    plus the draft for speculative decoding), as the sampler would say after the batch is built."""
    if context is None:
        return
    gen = model.generation_config
    n = n if n is not None else int(getattr(gen, "max_new_tokens", None) or 128)
    length, b = len(ids), getattr(model.config, "block_size", None)
    if sampling.speculative:  # the sampler's own reach (`speculative_sample`): 2k + 1 ahead, one more guessing
        k = sampling.draft_length or b or 1
        need = length + n + 2 * k + int(sampling.guess_bonus)
    elif b:
        need = (length // b + -(-(length % b + n) // b)) * b
    else:
        need = length + n
    if need > context:
        raise APIError(400, f"the prompt ({length} tokens) and max_tokens ({n}) need {need} positions, more than "
                       f"the model's context of {context}: shorten the prompt or lower max_tokens",
                       param="max_tokens" if length < context else "prompt", code="context_length_exceeded")
