"""The OpenAI-compatible completions protocol: checking a request body, shaping responses and stream events.

Everything a request can get wrong is found here, before the request takes a place in a replica's queue, and
becomes a `RequestError` (HTTP status + one-line message, OpenAI's error body). No Ray in this module.

Sampling follows OpenAI's conventions: `temperature` 0 is greedy decoding (token-identical to `elision run`),
any other temperature samples (lossless rejection sampling from the model's own distribution after temperature
and `top_p`); the default temperature is 1, as in OpenAI's API.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_BODY_BYTES = 1 << 20  # a prompt over the position limit is refused anyway; this bounds what we read first
MAX_STOP_STRINGS = 4      # as in OpenAI's API


class RequestError(Exception):
    """A request the service refuses: `status` is the HTTP status, the message one line naming the problem."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind

    def body(self) -> dict:
        return error_body(str(self), self.kind, self.param)


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


@dataclass(frozen=True)
class ModelCard:
    """What the HTTP front needs to know about the served artifact, without loading its ONNX graph."""

    name: str
    max_positions: int | None
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    tokenizer_json: str = field(repr=False)  # the artifact's tokenizer.json text (checked by its sha256 on load)
    created: int = field(default_factory=lambda: int(time.time()))

    def models_list(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "elision", "max_positions": self.max_positions}]}


class CompletionRequest(BaseModel):
    """`POST /v1/completions`: the fields elision serves; any other field is refused rather than ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    model: Optional[str] = None
    max_tokens: int = 16
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=0)
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generation_options(self) -> dict:
        """Keyword arguments of `OrtGenerator.generate` (besides prompt and max_new_tokens)."""
        sampling = {} if self.greedy else {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                                           "seed": self.seed}
        return {"stop_strings": self.stop or None, **sampling}


def parse_completion_request(body: bytes) -> CompletionRequest:
    """The checked request, or RequestError (400) naming the first problem: bytes that are not UTF-8, text that is
    not a JSON object, a missing, unknown or mistyped field, a value out of range."""
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(f"request body of {len(body)} bytes is over the limit of {MAX_BODY_BYTES}", status=413)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise RequestError(f"request body must be a JSON object, got {type(data).__name__}")
    try:
        req = CompletionRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            raise RequestError(f"unknown field {where!r}; this service takes "
                               f"{', '.join(CompletionRequest.model_fields)}", param=where) from None
        raise RequestError(f"{where}: {first['msg']}", param=where) from None
    try:
        req.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("prompt is not valid Unicode (it holds a lone surrogate escape)", param="prompt") from None
    if not req.prompt:
        raise RequestError("prompt is empty", param="prompt")
    return req


def check_limits(req: CompletionRequest, prompt_tokens: int, card: ModelCard) -> None:
    """RequestError unless the request fits: max_tokens >= 1 and the prompt plus max_tokens within the model's
    position limit (the size of a replica's KV cache)."""
    if req.model is not None and req.model != card.name:
        raise RequestError(f"model {req.model!r} is not served here; this service serves {card.name!r}",
                           status=404, param="model", kind="not_found_error")
    if req.max_tokens < 1:
        raise RequestError(f"max_tokens must be >= 1, got {req.max_tokens}", param="max_tokens")
    if prompt_tokens == 0:
        raise RequestError("prompt encodes to zero tokens", param="prompt")
    limit = card.max_positions
    if limit is None:
        return
    if req.max_tokens > limit - 1:
        raise RequestError(f"max_tokens={req.max_tokens} is over the model's limit: the position limit is {limit}, "
                           f"so at most {limit - 1} new tokens after a one-token prompt", param="max_tokens")
    if prompt_tokens >= limit:
        raise RequestError(f"prompt of {prompt_tokens} tokens is over the model's position limit of {limit}",
                           param="prompt")
    if prompt_tokens + req.max_tokens > limit:
        raise RequestError(f"a {prompt_tokens}-token prompt plus max_tokens={req.max_tokens} exceeds the model's "
                           f"position limit of {limit}; lower max_tokens to at most {limit - prompt_tokens}",
                           param="max_tokens")


def finish_reason(tokens: list[int], max_tokens: int, eos_token_ids: tuple[int, ...]) -> str:
    """OpenAI's finish_reason: "length" when the generation ran to max_tokens, else "stop" (EOS or a stop string)."""
    if len(tokens) >= max_tokens and not (tokens and tokens[-1] in eos_token_ids):
        return "length"
    return "stop"


class Completion:
    """One response being built: the ids, timestamps and model name shared by its body or stream chunks."""

    def __init__(self, model: str):
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _envelope(self, choice: dict) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "logprobs": None, **choice}]}

    def body(self, text: str, reason: str, result: dict) -> dict:
        """The non-streaming response; `result` is the replica's {tokens, stats, prompt_tokens, replica}."""
        return {**self._envelope({"text": text, "finish_reason": reason}), "usage": usage(result),
                "elision": elision_extra(result)}

    def chunk(self, text: str) -> str:
        return sse(self._envelope({"text": text, "finish_reason": None}))

    def last_chunk(self, text: str, reason: str, result: dict) -> str:
        """The final stream event: the held-back text, finish_reason, usage and the generation statistics."""
        return sse({**self._envelope({"text": text, "finish_reason": reason}), "usage": usage(result),
                    "elision": elision_extra(result)})


def usage(result: dict) -> dict:
    n_prompt, n_new = int(result["prompt_tokens"]), len(result["tokens"])
    return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}


def elision_extra(result: dict) -> dict:
    """The extra response field: what `elision run --json` prints (tokens, text, stats) plus the serving replica."""
    return {"tokens": result["tokens"], "text": result["text"], "stats": result["stats"],
            "replica": result.get("replica")}


def sse(payload: Any) -> str:
    """One server-sent event (`data: ...` and a blank line), as OpenAI streams completions."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


SSE_DONE = sse("[DONE]")
