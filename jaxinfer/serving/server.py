"""The OpenAI-compatible HTTP server (FastAPI): completions, chat, models, health, metrics.

    state = ServerState("smollm2-135m-instruct", api_key=None)
    app = create_app(state)          # /health answers 503 until a model is attached
    state.attach(Engine(model, EngineConfig()))   # warms up nothing: call engine.warmup() first

Requests become `scheduler.Request`s whose sink pushes each `Output` into an asyncio queue
of the request's handler; streaming handlers turn them into server-sent events. A client
that disconnects has its request aborted, which frees its slot and pages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxinfer.sampling import SamplingParams
from jaxinfer.serving import protocol
from jaxinfer.serving.engine import Engine
from jaxinfer.serving.metrics import Metrics
from jaxinfer.serving.scheduler import EngineUnavailable, Output, QueueFull, Scheduler
from jaxinfer.serving.scheduler import Request as EngineRequest

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class APIError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (
            status, message, kind, param, code
        )

    def response(self) -> JSONResponse:
        body = protocol.error_body(self.message, self.kind, self.param, self.code)
        return JSONResponse(body, status_code=self.status)


@dataclasses.dataclass
class ServerState:
    """What the endpoints share: the served name, the scheduler (once loaded), metrics."""

    model_name: str
    api_key: str | None = None
    scheduler: Scheduler | None = None
    draining: bool = False  # set on SIGTERM: in-flight requests finish, new ones get 503
    metrics: Metrics = None  # type: ignore[assignment]
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        if self.metrics is None:
            self.metrics = Metrics(self.model_name)

    def attach(self, engine: Engine) -> Scheduler:
        """Starts serving `engine` (warm it up first): /health turns 200."""
        scheduler = Scheduler(engine, self.metrics)
        self.metrics.watch(
            lambda: scheduler.num_running,
            lambda: scheduler.num_waiting,
            lambda: scheduler.kv_cache_usage,
        )
        scheduler.start()
        self.scheduler = scheduler
        return scheduler

    @property
    def ready(self) -> bool:
        return self.scheduler is not None and self.scheduler.alive and not self.draining

    def require_ready(self) -> Scheduler:
        if self.draining:
            raise APIError(503, "the server is shutting down", "service_unavailable")
        if self.scheduler is None:
            raise APIError(503, "the model is still loading; retry shortly", "service_unavailable")
        if not self.scheduler.alive:
            raise APIError(503, self.scheduler.why_unavailable(), "service_unavailable")
        return self.scheduler


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="jaxinfer", docs_url=None, redoc_url=None)
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail)).response()

    @app.middleware("http")
    async def _authorize(request: Request, call_next):
        if state.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            expected = f"Bearer {state.api_key}"
            if not secrets.compare_digest(given.encode(), expected.encode()):
                return APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                "authentication_error", code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        if state.ready:
            return JSONResponse({"status": "ok"})
        why = "draining" if state.draining else "not ready"
        if state.scheduler is not None and state.scheduler.error is not None:
            why = "engine loop failed"
        return JSONResponse({"status": why}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": state.model_name, "object": "model", "created": state.created,
                "owned_by": "jaxinfer"}
        if state.scheduler is not None:
            card["max_model_len"] = state.scheduler.context
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, http: Request) -> Response:
        scheduler = _checked(state, body.model)
        tokenizer = scheduler.tokenizer
        if isinstance(body.prompt, str):
            prompt_ids = tokenizer.encode(body.prompt)
        else:
            prompt_ids = list(body.prompt)
            vocab = scheduler.vocab_size
            if max(prompt_ids) >= vocab:
                raise APIError(400, f"prompt token id {max(prompt_ids)} is outside the "
                               f"vocabulary [0, {vocab})", param="prompt")
        max_tokens = body.max_tokens
        if max_tokens is None:
            room = scheduler.context - len(prompt_ids)
            max_tokens = max(1, min(COMPLETION_DEFAULT_MAX_TOKENS, room))
        return await _serve(state, scheduler, http, body, prompt_ids, max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatCompletionRequest, http: Request) -> Response:
        scheduler = _checked(state, body.model)
        tokenizer = scheduler.tokenizer
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template may raise anything on odd input
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from e
        prompt_ids = tokenizer.encode(prompt, add_bos=False)  # the template places any BOS
        max_tokens = body.token_limit
        if max_tokens is None:  # chat: up to the end of the context
            max_tokens = max(1, scheduler.context - len(prompt_ids))
        return await _serve(state, scheduler, http, body, prompt_ids, max_tokens, chat=True)

    return app


def _checked(state: ServerState, model: str) -> Scheduler:
    scheduler = state.require_ready()
    if model != state.model_name:
        raise APIError(400, f"model {model!r} is not served here; this server serves "
                       f"{state.model_name!r}", param="model", code="model_not_found")
    return scheduler


def _validation_error(error: RequestValidationError) -> APIError:
    problems = error.errors()
    if any(p["type"] == "json_invalid" for p in problems):
        return APIError(400, "the request body is not valid JSON")
    if any(tuple(p["loc"]) == ("body",) for p in problems):
        return APIError(400, "the request body must be a JSON object (Content-Type: "
                        "application/json)")
    parts, params = [], []
    for problem in problems[:5]:
        where = ".".join(str(p) for p in problem["loc"] if p != "body")
        # A field typed as a union reports each alternative; the field name is enough.
        where = where.split(".str", 1)[0].split(".list", 1)[0].split(".int", 1)[0]
        message = problem["msg"].removeprefix("Value error, ")
        parts.append(f"{where or 'body'}: {message}")
        params.append(where)
    return APIError(400, "; ".join(dict.fromkeys(parts)), param=params[0] if params else None)


async def _serve(state: ServerState, scheduler: Scheduler, http: Request, body, prompt_ids,
                 max_tokens: int, *, chat: bool) -> Response:
    """Submits the request and answers it whole, or as server-sent events."""
    seed = body.seed if body.seed is not None else random.getrandbits(32)
    try:
        sampling = SamplingParams(temperature=body.temperature, top_k=max(body.top_k, 0),
                                  top_p=body.top_p, min_p=body.min_p, seed=seed % 2**32)
    except ValueError as e:
        raise APIError(400, str(e)) from e
    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue[Output] = asyncio.Queue()
    request = EngineRequest(
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        sampling=sampling,
        stop=tuple(body.stop_strings),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        sink=lambda output: loop.call_soon_threadsafe(outputs.put_nowait, output),
    )
    try:
        scheduler.submit(request)
    except QueueFull as e:
        raise APIError(429, str(e), "rate_limit_exceeded", code="queue_full") from e
    except EngineUnavailable as e:
        raise APIError(503, str(e), "service_unavailable") from e
    except ValueError as e:
        raise APIError(400, str(e), param="max_tokens" if "context" in str(e) else None) from e
    request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        events = _stream(scheduler, request, outputs, request_id, state.model_name, chat,
                         body.include_usage)
        return StreamingResponse(events, media_type="text/event-stream")
    return await _whole(scheduler, http, request, outputs, request_id, state.model_name, chat)


async def _whole(scheduler, http: Request, request: EngineRequest, outputs: asyncio.Queue,
                 request_id: str, model: str, chat: bool) -> Response:
    pieces: list[str] = []
    try:
        while True:
            try:
                output = await asyncio.wait_for(outputs.get(), timeout=1.0)
            except TimeoutError:
                if await http.is_disconnected():
                    scheduler.abort(request.id)
                    return Response(status_code=499)
                continue
            if output.error:
                raise APIError(503, output.error, "service_unavailable")
            pieces.append(output.text)
            if output.finish_reason:
                break
    except asyncio.CancelledError:
        scheduler.abort(request.id)
        raise
    text = "".join(pieces)
    counts = protocol.usage(output.prompt_tokens, output.completion_tokens)
    if chat:
        body = protocol.chat_completion(request_id, model, text, output.finish_reason, counts)
    else:
        body = protocol.completion(request_id, model, text, output.finish_reason, counts)
    return JSONResponse(body)


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _stream(scheduler, request: EngineRequest, outputs: asyncio.Queue, request_id: str,
                  model: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    finished = False
    try:
        if chat:
            yield _sse(protocol.chat_chunk(request_id, model, {"role": "assistant",
                                                               "content": ""}, None))
        while not finished:
            output: Output = await outputs.get()
            finished = output.finish_reason is not None
            if output.error:
                yield _sse(protocol.error_body(output.error, "service_unavailable"))
                break
            if not output.text and not finished:
                continue
            if chat:
                delta = {"content": output.text} if output.text else {}
                yield _sse(protocol.chat_chunk(request_id, model, delta, output.finish_reason))
            else:
                yield _sse(protocol.completion(request_id, model, output.text,
                                               output.finish_reason, None, chunk=True))
        if include_usage and not output.error:
            counts = protocol.usage(output.prompt_tokens, output.completion_tokens)
            if chat:
                yield _sse(protocol.chat_chunk(request_id, model, None, None, counts))
            else:
                body = protocol.completion(request_id, model, "", None, counts, chunk=True)
                body["choices"] = []
                yield _sse(body)
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away (or the server is stopping): free the slot
            scheduler.abort(request.id)
