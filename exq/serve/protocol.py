"""OpenAI request bodies, their validation, and OpenAI-style errors.

Anything the engine cannot honour (n > 1, logprobs, penalties, tools...) is refused with a 400 that names the field,
rather than silently ignored: a client relying on it should know.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from exq.serve.sampling import SamplingParams

MAX_STOP = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {
            400: "invalid_request_error",
            404: "not_found_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
            503: "service_unavailable",
        }.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as OpenAI's server does

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # an extension (vLLM / SGLang accept it too)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # an extension, for benchmarks

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise ApiError(400, "only n=1 is supported", "n", "unsupported_parameter")
        if self.presence_penalty or self.frequency_penalty:
            param = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            raise ApiError(400, f"{param} is not supported (leave it 0)", param, "unsupported_parameter")
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", "logit_bias", "unsupported_parameter")
        stops = self.stop_list()
        if len(stops) > MAX_STOP:
            raise ApiError(400, f"at most {MAX_STOP} stop sequences", "stop")

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=max_tokens,
            stop=self.stop_list(),
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("echo", "logprobs", "suffix"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported", name, "unsupported_parameter")
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported", "best_of", "unsupported_parameter")

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, str):
            return p
        if not p:
            raise ApiError(400, "prompt is empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return list(p)  # token ids
        if len(p) == 1:
            return p[0]
        raise ApiError(400, "only one prompt per request is supported (send several requests)", "prompt")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ApiError(400, f"message content of type {part.get('type')!r} is not supported", "messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    tools: list[dict] | None = None
    response_format: dict | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs:
            raise ApiError(400, "logprobs is not supported", "logprobs", "unsupported_parameter")
        if self.tools:
            raise ApiError(400, "tools are not supported", "tools", "unsupported_parameter")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ApiError(400, "only response_format type 'text' is supported", "response_format")
        for m in self.messages:
            if m.role not in ("system", "developer", "user", "assistant"):
                raise ApiError(400, f"message role {m.role!r} is not supported", "messages")


def parse(raw: bytes, cls: type[BaseModel], max_bytes: int) -> Any:
    """Body bytes -> a validated request, or the ApiError a client should see."""
    if len(raw) > max_bytes:
        raise ApiError(413, f"request body of {len(raw)} bytes exceeds the limit of {max_bytes}", None, "too_large")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", None, "invalid_json") from e
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", None, "invalid_json")
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or None
        raise ApiError(400, f"{loc}: {err['msg']}" if loc else err["msg"], loc, "invalid_value") from e
    req.refuse_unsupported()
    return req
