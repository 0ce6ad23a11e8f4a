"""The OpenAI wire format `dlm-adapt serve` speaks: request bodies (pydantic models, strict types), the one mapping
from a request's decoding fields to `diffusion_generate`'s options, and OpenAI-style errors."""

import dataclasses
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config.commands import SamplingOptions
from ..errors import AdaptError
from ..sampling.generate import check_options


class APIError(Exception):
    """An error answered as OpenAI answers it: `{"error": {"message", "type", "param", "code"}}` with a status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    """Fields both endpoints take. Strict: `"5"` is not a number and `true` is not 1. Fields OpenAI defines that
    change nothing here (`user`, penalties at their defaults, ...) are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    n: int = 1
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    logprobs: bool | int | None = None
    # dlm-adapt's own decoding settings (extra body fields; `generate`'s flags of the same names)
    steps: int | None = None
    block_length: int | None = None
    remasking: str | None = None
    threshold: float | None = None
    entropy_bound: float | None = None
    sub_block: int | None = None
    top_k: int | None = None
    min_tokens: int | None = None
    kv_cache: str | None = None
    speculative: bool = False
    draft_length: int | None = None


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict]


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


def parse(raw: bytes, cls: type[_Request]) -> _Request:
    """The body as `cls`, or the first problem as a 400 naming the field."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        request = cls.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-", "list[")))
        raise APIError(400, f"{where or 'body'}: {first['msg']}", param=where or None, code="invalid_type") from None
    unsupported = {"n": request.n != 1, "logprobs": request.logprobs not in (None, False, 0),
                   "echo": getattr(request, "echo", False), "suffix": getattr(request, "suffix", None) is not None,
                   "best_of": getattr(request, "best_of", None) not in (None, 1)}
    for name, used in unsupported.items():
        if used:
            raise APIError(400, f"{name} is not supported: dlm-adapt serve returns one choice per request"
                           + ("" if name == "n" else f"; leave {name} unset"), param=name, code="unsupported")
    return request


def max_new_tokens(request: _Request) -> int | None:
    return getattr(request, "max_completion_tokens", None) if request.max_tokens is None else request.max_tokens


def sampling_options(request: _Request) -> SamplingOptions:
    """THE mapping from a request's decoding fields to the sampler's options (unset: the checkpoint's
    generation_config.json, as in `dlm-adapt generate`). max_tokens and seed travel apart (`max_new_tokens`)."""
    return SamplingOptions(steps=request.steps, block_length=request.block_length, remasking=request.remasking,
                           threshold=request.threshold, entropy_bound=request.entropy_bound,
                           sub_block=request.sub_block, temperature=request.temperature, top_k=request.top_k,
                           top_p=request.top_p, min_new_tokens=request.min_tokens, kv_cache=request.kv_cache,
                           speculative=bool(request.speculative), draft_length=request.draft_length)


def check_request(model, request: _Request, sampling: SamplingOptions) -> int | None:
    """`generate`'s own checks (the same words as the CLI's errors, as 400s) against the served model's config.
    Returns max_new_tokens."""
    n = max_new_tokens(request)
    if n is not None and n < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {n}", param="max_tokens", code="invalid_value")
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    if len(stops) > 4 or not all(stops):
        raise APIError(400, "stop takes up to 4 non-empty strings", param="stop", code="invalid_value")
    try:
        check_options(model, ["-"], dataclasses.replace(sampling, max_new_tokens=n))
    except AdaptError as e:
        raise APIError(400, str(e), code="invalid_value") from None
    return n


def chat_text(tokenizer, messages: list[Message]) -> str:
    """The conversation through the checkpoint's chat template, ready for the assistant's turn."""
    if not tokenizer.chat_template:
        raise APIError(400, "this checkpoint's tokenizer has no chat template: use /v1/completions, or start the "
                       "server with --chat-template FILE", param="messages", code="no_chat_template")
    turns = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):  # OpenAI's content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, "message content parts must be {\"type\": \"text\", \"text\": ...}",
                               param=f"messages.{i}.content", code="invalid_type")
            content = "".join(p["text"] for p in content)
        turns.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
