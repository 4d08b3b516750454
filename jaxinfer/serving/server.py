"""The OpenAI-compatible HTTP server (FastAPI): completions, chat, models, health, metrics.

    state = ServerState("smollm2-135m-instruct", api_key=None)
    app = create_app(state)          # /health answers 503 until a model is attached
    state.attach(Engine(model, EngineConfig()))   # warms up nothing: call engine.warmup() first

Requests become `scheduler.Request`s whose sink pushes each `Output` into an asyncio queue
of the request's handler; streaming handlers turn them into server-sent events. A client
that disconnects, streaming or not, has its request aborted, which frees its slot and pages.

The event loop does no request work: a body over `max_body_bytes` is refused (413) before it
is parsed, and tokenizing and chat templates run on worker threads. A request that fails in
the engine gets a 500 with an OpenAI error body (a stream: a chunk with finish_reason "abort",
an error event, `[DONE]`); one the server cannot finish (engine down, shutting down) a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import random
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from jaxinfer.sampling import SamplingParams
from jaxinfer.serving import protocol
from jaxinfer.serving.engine import Engine
from jaxinfer.serving.metrics import Metrics
from jaxinfer.serving.scheduler import EngineUnavailable, Output, QueueFull, Scheduler
from jaxinfer.serving.scheduler import Request as EngineRequest

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SHUTTING_DOWN = "the server is shutting down; the request could not finish in time"


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
    max_body_bytes: int = 4 * 2**20  # larger request bodies get 413
    scheduler: Scheduler | None = None
    draining: bool = False  # set on SIGTERM: in-flight requests finish, new ones get 503
    metrics: Metrics = None  # type: ignore[assignment]
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    model_version: str = "1"  # in every metric's labels and the x-jaxinfer-model-version header
    registry: CollectorRegistry | None = None  # shared by the models of one server (router)

    def __post_init__(self):
        if self.metrics is None:
            self.metrics = Metrics(self.model_name, self.model_version, self.registry)

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

    async def drain(self, timeout_s: float) -> int:
        """Refuses new requests, gives those in flight `timeout_s` seconds to finish, ends the
        rest with an abort (503 / an error event) and stops the engine loop. Returns how many
        requests had to be aborted."""
        self.draining = True
        scheduler = self.scheduler
        if scheduler is None:
            return 0
        deadline = time.monotonic() + timeout_s
        while scheduler.num_unfinished and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        unfinished = scheduler.num_unfinished
        await asyncio.to_thread(scheduler.stop, 30, SHUTTING_DOWN)
        return unfinished

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


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413 before any of it is parsed."""

    def __init__(self, app: ASGIApp, limit: int, metrics=None):  # anything with .error(status)
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(f"{int(declared)} bytes", scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away while sending
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._refuse(f"more than {self.limit} bytes", scope, receive, send)
        body = b"".join(chunks)

        async def replay() -> dict:
            nonlocal body
            if body is None:
                return await receive()
            message, body = {"type": "http.request", "body": body, "more_body": False}, None
            return message

        await self.app(scope, replay, send)

    async def _refuse(self, size: str, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body has {size}; this server accepts at most {self.limit}"
        if self.metrics is not None:
            self.metrics.error(413)
        await APIError(413, message, code="request_too_large").response()(scope, receive, send)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="jaxinfer", docs_url=None, redoc_url=None)
    app.state.server = state

    def answer(error: APIError) -> JSONResponse:
        state.metrics.error(error.status)  # jaxinfer:request_errors_total{code}
        return error.response()

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return answer(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return answer(_validation_error(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return answer(APIError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def _internal(_: Request, error: Exception) -> JSONResponse:
        return answer(APIError(500, f"internal error: {error!r}", "server_error"))

    @app.middleware("http")
    async def _authorize(request: Request, call_next):
        if state.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            expected = f"Bearer {state.api_key}"
            if not secrets.compare_digest(given.encode(), expected.encode()):
                return answer(APIError(401, "invalid or missing API key (Authorization: "
                                       "Bearer ...)", "authentication_error",
                                       code="invalid_api_key"))
        response = await call_next(request)
        response.headers["x-jaxinfer-model-version"] = state.model_version
        return response

    app.add_middleware(_BodyLimit, limit=state.max_body_bytes, metrics=state.metrics)

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
        if isinstance(body.prompt, str):  # on a worker thread: a long prompt takes seconds
            prompt_ids = await asyncio.to_thread(scheduler.tokenizer.encode, body.prompt)
        else:
            prompt_ids = _in_vocabulary(scheduler, list(body.prompt), "prompt")
        max_tokens = body.max_tokens
        if max_tokens is None:
            room = scheduler.context - len(prompt_ids)
            max_tokens = max(1, min(COMPLETION_DEFAULT_MAX_TOKENS, room))
        return await _serve(state, scheduler, http, body, prompt_ids, max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatCompletionRequest, http: Request) -> Response:
        scheduler = _checked(state, body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt_ids = await asyncio.to_thread(_chat_prompt, scheduler.tokenizer, messages)
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
    state.metrics.requests.inc()
    return scheduler


def _chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt's token ids: the chat template rendered, then encoded (a worker thread's job)."""
    try:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template may raise anything on odd input
        raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from e
    return tokenizer.encode(prompt, add_bos=False)  # the template places any BOS


def _in_vocabulary(scheduler: Scheduler, ids: list[int], field: str) -> list[int]:
    vocab = scheduler.vocab_size
    if outside := [t for t in ids if t >= vocab]:
        raise APIError(400, f"{field}: token id {outside[0]} is outside the vocabulary "
                       f"[0, {vocab})", param=field)
    return ids


def _engine_seed(seed: int | None) -> int:
    """The engine's 32-bit seed: a seed in [0, 2**32) as it is, any other int64 hashed to 32
    bits, none a random one."""
    if seed is None:
        return random.getrandbits(32)
    if 0 <= seed < 2**32:
        return seed
    digest = hashlib.blake2b(seed.to_bytes(8, "little", signed=True), digest_size=4).digest()
    return int.from_bytes(digest, "little")


_BODY_TYPE_ERRORS = {"model_attributes_type", "model_type", "dict_type"}


def _validation_error(error: RequestValidationError) -> APIError:
    problems = error.errors()
    if any(p["type"] == "json_invalid" for p in problems):
        return APIError(400, "the request body is not valid JSON")
    if any(tuple(p["loc"]) == ("body",) and p["type"] in _BODY_TYPE_ERRORS for p in problems):
        return APIError(400, "the request body must be a JSON object (Content-Type: "
                        "application/json)")
    parts, params = [], []
    for problem in problems[:5]:
        where = ".".join(str(p) for p in problem["loc"] if p != "body")
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"].endswith("_type"):
            message += f" (got {_json_type(problem['input'])})"
        parts.append(f"{where or 'body'}: {message}")
        params.append(where)
    return APIError(400, "; ".join(dict.fromkeys(parts)), param=params[0] if params else None)


def _json_type(value) -> str:
    kinds = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
             (list, "an array"), (dict, "an object"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "null")


async def _serve(state: ServerState, scheduler: Scheduler, http: Request, body, prompt_ids,
                 max_tokens: int, *, chat: bool) -> Response:
    """Submits the request and answers it whole, or as server-sent events."""
    vocab = scheduler.vocab_size
    top_k = body.top_k if 0 < body.top_k < vocab else 0  # 0: all tokens
    try:
        sampling = SamplingParams(temperature=body.temperature, top_k=top_k, top_p=body.top_p,
                                  min_p=body.min_p, seed=_engine_seed(body.seed))
    except ValueError as e:
        raise APIError(400, str(e)) from e
    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue[Output] = asyncio.Queue()

    def sink(output: Output) -> None:  # on the engine thread, which must outlive any client
        with contextlib.suppress(RuntimeError):  # this handler's event loop has closed
            loop.call_soon_threadsafe(outputs.put_nowait, output)

    request = EngineRequest(
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        sampling=sampling,
        stop=tuple(body.stop_strings),
        stop_token_ids=tuple(_in_vocabulary(scheduler, body.stop_token_ids or [],
                                            "stop_token_ids")),
        sink=sink,
    )
    state.require_ready()  # tokenizing took a while: the server may be draining by now
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
        events = _stream(state, request, outputs, request_id, chat, body.include_usage)
        return StreamingResponse(events, media_type="text/event-stream")
    return await _whole(state, http, request, outputs, request_id, chat)


def _failure(state: ServerState, output: Output) -> APIError:
    """The error for a request the engine ended with `output.error`: 503 when the engine is
    down or the server is shutting down, else 500 (this request failed, others carry on)."""
    if state.draining or not state.scheduler.alive:
        return APIError(503, output.error, "service_unavailable")
    return APIError(500, output.error, "server_error")


async def _abort_on_disconnect(http: Request, scheduler: Scheduler, request_id: str) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass
    scheduler.abort(request_id)


async def _whole(state: ServerState, http: Request, request: EngineRequest,
                 outputs: asyncio.Queue, request_id: str, chat: bool) -> Response:
    scheduler, model = state.scheduler, state.model_name
    watcher = asyncio.ensure_future(_abort_on_disconnect(http, scheduler, request.id))
    pieces: list[str] = []
    try:
        while True:
            output = await outputs.get()
            if output.error:
                raise _failure(state, output)
            pieces.append(output.text)
            if output.finish_reason:
                break
    except asyncio.CancelledError:
        scheduler.abort(request.id)
        raise
    finally:
        watcher.cancel()
    if output.finish_reason == "abort":  # the client went away: nobody reads this
        return Response(status_code=499)
    text = "".join(pieces)
    counts = protocol.usage(output.prompt_tokens, output.completion_tokens)
    if chat:
        body = protocol.chat_completion(request_id, model, text, output.finish_reason, counts)
    else:
        body = protocol.completion(request_id, model, text, output.finish_reason, counts)
    return JSONResponse(body)


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _stream(state: ServerState, request: EngineRequest, outputs: asyncio.Queue,
                  request_id: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    scheduler, model = state.scheduler, state.model_name
    finished = False
    try:
        if chat:
            yield _sse(protocol.chat_chunk(request_id, model, {"role": "assistant",
                                                               "content": ""}, None))
        while not finished:
            output: Output = await outputs.get()
            finished = output.finish_reason is not None
            if output.error:  # the last chunk says "abort", then the error itself
                if chat:
                    yield _sse(protocol.chat_chunk(request_id, model, {}, "abort"))
                else:
                    yield _sse(protocol.completion(request_id, model, "", "abort", None,
                                                   chunk=True))
                error = _failure(state, output)
                state.metrics.error(error.status)  # the 200 was sent: count what it became
                yield _sse(protocol.error_body(error.message, error.kind))
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
