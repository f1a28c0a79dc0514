"""The HTTP layer: OpenAI's /v1/completions and /v1/chat/completions (streaming or not), /v1/models, /health,
/metrics, on FastAPI (request parsing, streaming responses, lifespan) served by uvicorn (graceful SIGTERM).

Handlers only validate, tokenize and relay: the engine thread does the model work and pushes `Event`s, which hop
onto the event loop through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from exq.serve.engine import Engine, Event, QueueFull, ShuttingDown
from exq.serve.engine import Request as GenRequest
from exq.serve.metrics import Metrics
from exq.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse

# Used when the tokenizer has no chat template: plain "role: text" lines, then the assistant's turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass
class Limits:
    max_body_bytes: int = 4 << 20
    max_tokens: int | None = None  # per request; None = whatever the context leaves
    default_chat_max_tokens: int = 1024
    poll_disconnect_s: float = 0.5


class ClientGone(Exception):
    pass


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The model's own chat template (its special tokens included), or the plain default."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    text = tokenizer.apply_chat_template(
        messages, chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text).input_ids


def create_app(
    engine: Engine, tokenizer, model_name: str, limits: Limits | None = None, own_engine: bool = True
) -> FastAPI:
    """own_engine: the app's lifespan starts the engine on a thread and stops it; otherwise the caller runs it."""
    limits = limits or Limits()
    metrics = Metrics(engine)
    created = int(time.time())
    vocab = len(tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if own_engine and not engine.alive:
            engine.start()
        if getattr(app.state, "banner", None):
            print(app.state.banner, flush=True)
        yield
        if own_engine:
            engine.stop()  # uvicorn has drained the open requests by now (graceful shutdown on SIGTERM)

    app = FastAPI(title="exq", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.metrics = engine, metrics

    def error(e: ApiError, endpoint: str) -> JSONResponse:
        metrics.requests.labels(endpoint, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = "model_not_found" if exc.status_code == 404 else None
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), None, code).body(), status_code=exc.status_code)

    def model_card() -> dict:
        return {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "exq",
            "max_model_len": engine.max_model_len,
        }

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "running": engine.running_count(), "waiting": engine.queue_depth()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name != model_name:
            return error(ApiError(404, f"model {name!r} does not exist", "model", "model_not_found"), "models")
        return model_card()

    def prompt_ids(req) -> list[int]:
        if isinstance(req, ChatRequest):
            return chat_prompt(tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages])
        p = req.single_prompt()
        if isinstance(p, str):
            return tokenizer(p).input_ids
        if any(not 0 <= t < vocab for t in p):
            raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", "prompt")
        return p

    def budget(req, n_prompt: int) -> int:
        ctx = engine.max_model_len
        if n_prompt >= ctx:
            raise ApiError(
                413,
                f"the prompt has {n_prompt} tokens; this server's context is {ctx} tokens, leaving none to generate",
                "prompt" if isinstance(req, CompletionRequest) else "messages",
                "context_length_exceeded",
            )
        asked = req.max_tokens
        name = "max_tokens"
        if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
            asked, name = req.max_completion_tokens, "max_completion_tokens"
        room = ctx - n_prompt
        if asked is None:
            asked = 16 if isinstance(req, CompletionRequest) else min(room, limits.default_chat_max_tokens)
            asked = min(asked, room, limits.max_tokens or room)
        if limits.max_tokens is not None and asked > limits.max_tokens:
            raise ApiError(400, f"{name}={asked} exceeds this server's limit of {limits.max_tokens}", name)
        if asked > room:
            raise ApiError(
                400,
                f"{name}={asked} plus the prompt's {n_prompt} tokens exceeds the context of {ctx} tokens",
                name,
                "context_length_exceeded",
            )
        return asked

    async def handle(request: Request, cls, endpoint: str):
        try:
            if not engine.alive:
                raise ApiError(503, "the engine is not running (starting up or shutting down)")
            req = parse(await request.body(), cls, limits.max_body_bytes)
            if req.model != model_name:
                raise ApiError(
                    404,
                    f"model {req.model!r} does not exist; this server serves {model_name!r}",
                    "model",
                    "model_not_found",
                )
            ids = prompt_ids(req)
            if not ids:
                raise ApiError(400, "the prompt is empty", "prompt")
            params = req.sampling(budget(req, len(ids)))
            loop, queue = asyncio.get_running_loop(), asyncio.Queue()

            def sink(ev: Event) -> None:
                with contextlib.suppress(RuntimeError):  # the loop closed (server stopped)
                    loop.call_soon_threadsafe(queue.put_nowait, ev)

            gen = GenRequest(ids, params, sink)
            try:
                engine.submit(gen)
            except QueueFull as e:
                raise ApiError(429, f"too many requests: {e}", None, "rate_limit_exceeded") from e
            except ShuttingDown as e:
                raise ApiError(503, str(e)) from e
        except ApiError as e:
            return error(e, endpoint)
        chat = isinstance(req, ChatRequest)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            metrics.requests.labels(endpoint, "200").inc()
            return StreamingResponse(
                _sse(engine, gen, queue, rid, model_name, chat, include_usage), media_type="text/event-stream"
            )
        try:
            text, last = await _collect(engine, gen, queue, request, limits.poll_disconnect_s)
        except ClientGone:
            metrics.requests.labels(endpoint, "499").inc()
            return Response(status_code=499)
        if last.error:
            return error(ApiError(500, last.error), endpoint)
        metrics.requests.labels(endpoint, "200").inc()
        return _response(rid, model_name, chat, text, last)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, CompletionRequest, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, ChatRequest, "chat_completions")

    return app


def _usage(ev: Event) -> dict:
    return {
        "prompt_tokens": ev.prompt_tokens,
        "completion_tokens": ev.completion_tokens,
        "total_tokens": ev.prompt_tokens + ev.completion_tokens,
    }


def _response(rid: str, model: str, chat: bool, text: str, last: Event) -> dict:
    choice: dict = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": _usage(last),
    }


async def _collect(engine: Engine, gen: GenRequest, queue: asyncio.Queue, request: Request, poll: float):
    """All events of a non-streaming request; a client that disconnects meanwhile frees its slot."""
    parts: list[str] = []
    while True:
        try:
            ev: Event = await asyncio.wait_for(queue.get(), timeout=poll)
        except TimeoutError:
            if await request.is_disconnected():
                engine.cancel(gen)
                raise ClientGone() from None
            continue
        parts.append(ev.text)
        if ev.finish_reason is not None or ev.error is not None:
            return "".join(parts), ev


async def _sse(
    engine: Engine, gen: GenRequest, queue: asyncio.Queue, rid: str, model: str, chat: bool, include_usage: bool
) -> AsyncIterator[str]:
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        body = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    done = False
    try:
        if chat:
            yield chunk(None, None, role=True)
        while True:
            ev: Event = await queue.get()
            if ev.error is not None:
                done = True
                yield f"data: {json.dumps(ApiError(500, ev.error).body())}\n\n"
                break
            if ev.text:
                yield chunk(ev.text, None)
            if ev.finish_reason is not None:
                done = True
                yield chunk(None, ev.finish_reason)
                if include_usage:
                    body = {
                        "id": rid,
                        "object": kind,
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": _usage(ev),
                    }
                    yield f"data: {json.dumps(body)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        if not done:  # the client went away mid-stream
            engine.cancel(gen)
