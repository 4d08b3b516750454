"""The OpenAI-compatible HTTP server (FastAPI): completions, chat, models, health, metrics,
and the watermark detector (POST /v1/watermark/detect; see jaxinfer.watermark).

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
import logging
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

from jaxinfer import watermark
from jaxinfer.sampling import SamplingParams
from jaxinfer.serving import protocol, structured
from jaxinfer.serving import tools as tools_module
from jaxinfer.serving.engine import Engine
from jaxinfer.serving.metrics import Metrics
from jaxinfer.serving.scheduler import EngineUnavailable, Output, QueueFull, Scheduler
from jaxinfer.serving.scheduler import Request as EngineRequest
from jaxinfer.serving.screening import Blocked, Screen, client_id

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SHUTTING_DOWN = "the server is shutting down; the request could not finish in time"
log = logging.getLogger("jaxinfer.server")


class APIError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (
            status, message, kind, param, code
        )
        self.headers = headers  # e.g. Retry-After on a 429

    def response(self) -> JSONResponse:
        body = protocol.error_body(self.message, self.kind, self.param, self.code)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


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
    screen: Screen | None = None  # input screening before admission (serving.screening)
    precision: str | None = None  # "high" / "fast": this copy's class under a precision route
    # The green-list watermark's secret (jaxinfer.watermark): requests are watermarked with it
    # unless they ask `watermark: false`. Never in a response, a log line or this repr.
    watermark_key: str | None = dataclasses.field(default=None, repr=False)

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
        if state.precision is not None:
            response.headers["x-jaxinfer-precision"] = state.precision
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

    @app.post("/tokenize")
    async def tokenize(body: protocol.TokenizeRequest) -> dict:
        scheduler = _checked(state, body.model or state.model_name)
        tokenizer = scheduler.tokenizer
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            text = await asyncio.to_thread(_render_chat, tokenizer, messages,
                                           body.add_generation_prompt)
            add_bos = bool(body.add_special_tokens)
        else:
            text, add_bos = body.prompt, body.add_special_tokens
        ids = await asyncio.to_thread(tokenizer.encode, text, None if add_bos else False)
        answer = {"count": len(ids), "max_model_len": scheduler.context, "tokens": ids,
                  "token_strs": None}
        if body.return_token_strs:
            answer["token_strs"] = [tokenizer.token_text(t) for t in ids]
        return answer

    @app.post("/detokenize")
    async def detokenize(body: protocol.DetokenizeRequest) -> dict:
        scheduler = _checked(state, body.model or state.model_name)
        ids = _in_vocabulary(scheduler, body.tokens, "tokens")
        return {"prompt": await asyncio.to_thread(scheduler.tokenizer.decode, ids)}

    @app.post("/v1/watermark/detect")
    async def watermark_detect(body: protocol.WatermarkDetectRequest) -> dict:
        scheduler = _checked(state, body.model or state.model_name)
        key = body.key or state.watermark_key
        if key is None:
            raise APIError(400, "give the watermark `key`: this server has none of its own "
                           "(--watermark_key)", param="key")
        ids = await asyncio.to_thread(scheduler.tokenizer.encode, body.text, False)
        if len(ids) < 2:
            raise APIError(400, f"the text has {len(ids)} token(s); scoring needs at least 2",
                           param="text")
        z, p_value, scored = watermark.detect(ids, key)
        return {"object": "watermark.detection", "z_score": z, "p_value": p_value,
                "tokens_scored": scored, "tokens": len(ids), "gamma": watermark.GAMMA}

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
        messages = [m.for_template() for m in body.messages]
        tools = body.tool_dicts if body.tool_choice != "none" else None
        prompt_ids = await asyncio.to_thread(_chat_prompt, scheduler.tokenizer, messages, tools)
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


def _render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                 tools: list[dict] | None = None) -> str:
    """The chat template rendered (tools in its `tools` variable, or written in Hermes style
    where the template has none: serving.tools)."""
    messages = tools_module.messages_for_template(messages, tools, tokenizer.chat_template)
    try:
        return tokenizer.apply_chat_template(messages,
                                             add_generation_prompt=add_generation_prompt,
                                             tools=tools)
    except Exception as e:  # noqa: BLE001 - a template may raise anything on odd input
        raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from e


def _chat_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The prompt's token ids: the chat template rendered, then encoded (a worker thread's job)."""
    # The template places any BOS.
    return tokenizer.encode(_render_chat(tokenizer, messages, True, tools), add_bos=False)


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


def _watermark_key(state: ServerState, body) -> str | None:
    """The key to watermark this request with, or None (off)."""
    if body.watermark and state.watermark_key is None:
        raise APIError(400, "watermark: true needs a server started with --watermark_key; "
                       "this one has no watermark key", param="watermark")
    return None if body.watermark is False else state.watermark_key


def _sampling(body, scheduler: Scheduler, watermark_key: str | None = None) -> SamplingParams:
    """The request's SamplingParams (choice 0's seed); errors are 400s naming the field."""
    vocab = scheduler.vocab_size
    top_k = body.top_k if 0 < body.top_k < vocab else 0  # 0: all tokens
    bias = {int(t): v for t, v in (body.logit_bias or {}).items()}
    if outside := [t for t in bias if t >= vocab]:
        raise APIError(400, f"logit_bias: token id {outside[0]} is outside the vocabulary "
                       f"[0, {vocab})", param="logit_bias")
    try:
        return SamplingParams(
            temperature=body.temperature, top_k=top_k, top_p=body.top_p, min_p=body.min_p,
            seed=_engine_seed(body.seed), presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, logit_bias=tuple(sorted(bias.items())),
            min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
            logprobs=body.top_logprobs_wanted, watermark_key=watermark_key)
    except ValueError as e:
        raise APIError(400, str(e)) from e


async def _matchers(scheduler: Scheduler, body) -> list:
    """One llguidance matcher per choice for the request's structured-output constraint
    (Nones without one); a constraint llguidance refuses is a 400 naming the problem."""
    try:
        found = body.constraint
    except ValueError as e:
        raise APIError(400, str(e)) from e
    forced, name = getattr(body, "forced_tool", (False, None))
    if forced:  # tool_choice "required" or a named function: the call's JSON, enforced
        if found is not None:
            raise APIError(400, f"tool_choice {body.tool_choice!r} and {found[0]} both "
                           "constrain the output; give one", param="tool_choice")
        found = ("tool_choice", "json_schema",
                 tools_module.call_schema(body.tool_dicts, name))
    if found is None:
        return [None] * body.n
    field, kind, spec = found
    constraint = structured.Constraint(kind, spec)
    try:
        return [await asyncio.to_thread(structured.matcher, constraint, scheduler.tokenizer,
                                        scheduler.vocab_size) for _ in range(body.n)]
    except structured.ConstraintError as e:
        raise APIError(400, f"{field}: {e}", param=field) from e


def choice_seed(seed: int, index: int) -> int:
    """The engine seed of choice `index` of a request whose engine seed is `seed`: choice i
    of an `n`-choice request draws what a single request with seed (seed + i) mod 2**32 does."""
    return (seed + index) % 2**32


@dataclasses.dataclass
class _Echo:
    """What `echo` puts before each choice: the prompt's text and (with logprobs) entries."""

    text: str
    logprobs: list[protocol.LogprobEntry] | None


async def _echo(scheduler: Scheduler, body, prompt_ids: list[int]) -> _Echo | None:
    if not getattr(body, "echo", False):
        return None
    tokenizer = scheduler.tokenizer
    text = body.prompt if isinstance(body.prompt, str) else tokenizer.decode(prompt_ids)
    if body.logprobs is None:
        return _Echo(text, None)
    k = body.logprobs
    scored = await asyncio.to_thread(scheduler.engine.prompt_logprobs, prompt_ids)
    entries = [(prompt_ids[0], None, [])] + [
        (token, float(scored.chosen[i]),
         list(zip(scored.top_ids[i, :k].tolist(), scored.top[i, :k].tolist(), strict=True)))
        for i, token in enumerate(prompt_ids[1:])]
    return _Echo(text, entries)


async def _serve(state: ServerState, scheduler: Scheduler, http: Request, body, prompt_ids,
                 max_tokens: int, *, chat: bool) -> Response:
    """Submits the request's `n` choices and answers them whole, or as server-sent events."""
    if state.screen is not None:
        await _screen(state, scheduler, http, body, prompt_ids, chat)
    if state.precision is not None:
        state.metrics.precision(body.precision or "auto", state.precision)
    sampling = _sampling(body, scheduler, _watermark_key(state, body))
    matchers = await _matchers(scheduler, body)
    echo = await _echo(scheduler, body, prompt_ids)
    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()

    def sink_of(index: int):
        def sink(output: Output) -> None:  # on the engine thread, which must outlive any client
            with contextlib.suppress(RuntimeError):  # this handler's event loop has closed
                loop.call_soon_threadsafe(outputs.put_nowait, (index, output))
        return sink

    stop_token_ids = tuple(_in_vocabulary(scheduler, body.stop_token_ids or [],
                                          "stop_token_ids"))
    requests = [EngineRequest(
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        sampling=dataclasses.replace(sampling, seed=choice_seed(sampling.seed, index)),
        stop=tuple(body.stop_strings),
        stop_token_ids=stop_token_ids,
        sink=sink_of(index),
        matcher=matchers[index],
    ) for index in range(body.n)]
    state.require_ready()  # tokenizing took a while: the server may be draining by now
    try:
        for request in requests:
            scheduler.submit(request)
    except (QueueFull, EngineUnavailable, ValueError) as e:
        for request in requests:  # the choices submitted already (the rest are unknown ids)
            scheduler.abort(request.id)
        if isinstance(e, QueueFull):
            raise APIError(429, str(e), "rate_limit_exceeded", code="queue_full") from e
        if isinstance(e, EngineUnavailable):
            raise APIError(503, str(e), "service_unavailable") from e
        raise APIError(400, str(e), param="max_tokens" if "context" in str(e) else None) from e
    request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
    tool_names = None  # the functions whose calls are parsed out of the text
    if chat and body.tools and body.tool_choice != "none":
        tool_names = {t.function.name for t in body.tools}
    if body.stream:
        events = _stream(state, requests, outputs, request_id, chat, body.include_usage, echo,
                         body.return_tokens_as_token_ids, tool_names)
        return StreamingResponse(events, media_type="text/event-stream")
    return await _whole(state, http, requests, outputs, request_id, chat, echo,
                        body.return_tokens_as_token_ids, tool_names)


async def _screen(state: ServerState, scheduler: Scheduler, http: Request, body, prompt_ids,
                  chat: bool) -> None:
    """Runs the server's screen on a worker thread; a blocked request is answered (400 or 429)
    and counted, and nothing about it but the reason and size is logged."""
    # Per API key when the server has one (checked already); else per address, since a key
    # the server does not check would let a client pick a fresh bucket per request.
    key = state.api_key and http.headers.get("authorization", "").removeprefix("Bearer ")
    client = client_id(key or None, http.client.host if http.client else None)

    def check() -> None:
        if chat:
            text = "\n".join(m.text() for m in body.messages)
        elif isinstance(body.prompt, str):
            text = body.prompt
        else:
            text = scheduler.tokenizer.decode(prompt_ids)
        state.screen.check(client, text, len(prompt_ids))

    try:
        await asyncio.to_thread(check)
    except Blocked as blocked:
        state.metrics.blocked(blocked.reason)
        log.info("blocked a request: reason=%s prompt_tokens=%d", blocked.reason,
                 len(prompt_ids))
        headers = None
        if blocked.retry_after is not None:
            headers = {"Retry-After": str(blocked.retry_after)}
        kind = "rate_limit_exceeded" if blocked.status == 429 else "invalid_request_error"
        raise APIError(blocked.status, blocked.message, kind, code=blocked.reason,
                       headers=headers) from None


def _failure(state: ServerState, output: Output) -> APIError:
    """The error for a request the engine ended with `output.error`: 503 when the engine is
    down or the server is shutting down, else 500 (this request failed, others carry on)."""
    if state.draining or not state.scheduler.alive:
        return APIError(503, output.error, "service_unavailable")
    return APIError(500, output.error, "server_error")


async def _abort_on_disconnect(http: Request, scheduler: Scheduler,
                               requests: list[EngineRequest]) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass
    for request in requests:
        scheduler.abort(request.id)


def _entries(output: Output) -> list[protocol.LogprobEntry]:
    return [(t.token, t.logprob, t.top) for t in output.logprobs or []]


def _logprobs(state: ServerState, entries: list[protocol.LogprobEntry] | None, chat: bool,
              text_offset: int = 0, as_ids: bool = False) -> dict | None:
    """The choice's `logprobs` object of `entries` (None when the request asked for none);
    `as_ids` spells each token "token_id:<id>" (vLLM's return_tokens_as_token_ids)."""
    if entries is None:
        return None
    tokenizer = state.scheduler.tokenizer

    def token_text(token: int) -> str:
        if as_ids:
            return f"token_id:{token}"
        return tokenizer.decode([token], skip_special_tokens=False)

    if chat:
        return protocol.chat_logprobs(entries, token_text)
    return protocol.completion_logprobs(entries, token_text, text_offset)


async def _whole(state: ServerState, http: Request, requests: list[EngineRequest],
                 outputs: asyncio.Queue, request_id: str, chat: bool,
                 echo: _Echo | None, as_ids: bool, tool_names: set[str] | None) -> Response:
    scheduler, model = state.scheduler, state.model_name
    watcher = asyncio.ensure_future(_abort_on_disconnect(http, scheduler, requests))
    wants_logprobs = requests[0].sampling.logprobs is not None
    pieces: list[list[str]] = [[] for _ in requests]
    entries: list[list] = [[] for _ in requests]
    last: dict[int, Output] = {}
    try:
        while len(last) < len(requests):
            index, output = await outputs.get()
            if output.error:
                for request in requests:
                    scheduler.abort(request.id)
                raise _failure(state, output)
            pieces[index].append(output.text)
            entries[index] += _entries(output)
            if output.finish_reason:
                last[index] = output
    except asyncio.CancelledError:
        for request in requests:
            scheduler.abort(request.id)
        raise
    finally:
        watcher.cancel()
    if any(o.finish_reason == "abort" for o in last.values()):  # the client went away
        return Response(status_code=499)
    counts = protocol.usage(last[0].prompt_tokens,
                            sum(o.completion_tokens for o in last.values()),
                            last[0].cached_tokens)
    prompt_logprobs = None  # echo: the prompt's logprobs lead every choice's
    if echo is not None and echo.logprobs is not None:
        prompt_logprobs = _logprobs(state, echo.logprobs, False, 0, as_ids)
    choices = []
    for index in range(len(requests)):
        text, reason = "".join(pieces[index]), last[index].finish_reason
        logprob_entries = entries[index] if wants_logprobs else None
        if chat:
            logprobs = _logprobs(state, logprob_entries, True, 0, as_ids)
            content, calls = text, []
            if tool_names is not None:
                content, calls = tools_module.parse_tool_calls(text, tool_names)
            body = protocol.chat_completion(request_id, model, content, reason, counts,
                                            index=index, logprobs=logprobs)
            if calls:
                body["choices"][0]["message"]["tool_calls"] = calls
                body["choices"][0]["finish_reason"] = "tool_calls"
        else:
            offset = 0
            if echo is not None:
                text = echo.text + text
                offset = (sum(map(len, prompt_logprobs["tokens"])) if prompt_logprobs
                          else len(echo.text))
            logprobs = _logprobs(state, logprob_entries, False, offset, as_ids)
            if prompt_logprobs is not None:
                logprobs = {key: prompt_logprobs[key] + logprobs[key] for key in logprobs}
            body = protocol.completion(request_id, model, text, reason, counts, index=index,
                                       logprobs=logprobs)
        choices += body["choices"]
    body["choices"] = choices
    if state.precision is not None:
        body["precision"] = state.precision
    return JSONResponse(body)


def _tool_deltas(text: str, tool_names: set[str], finish_reason: str):
    """(delta, finish_reason) chunks of a finished choice with tools: its content, then each
    tool call as OpenAI streams them (id, type and name first, then the arguments)."""
    content, calls = tools_module.parse_tool_calls(text, tool_names)
    if content:
        yield {"content": content}, None
    for i, call in enumerate(calls):
        function = call["function"]
        yield {"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                               "function": {"name": function["name"], "arguments": ""}}]}, None
        yield {"tool_calls": [{"index": i, "function": {"arguments": function["arguments"]}}]}, None
    yield {}, "tool_calls" if calls else finish_reason


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _stream(state: ServerState, requests: list[EngineRequest], outputs: asyncio.Queue,
                  request_id: str, chat: bool, include_usage: bool,
                  echo: _Echo | None, as_ids: bool,
                  tool_names: set[str] | None) -> AsyncIterator[str]:
    scheduler, model = state.scheduler, state.model_name
    wants_logprobs = requests[0].sampling.logprobs is not None
    finished: dict[int, Output] = {}
    failed = False
    offsets = [0] * len(requests)  # text_offset of each choice's next token
    # With tools, a choice's text is held to its end, then sent as content or tool calls.
    held = [""] * len(requests)
    try:
        for index in range(len(requests)):
            if chat:
                yield _sse(protocol.chat_chunk(request_id, model, {"role": "assistant",
                                                                   "content": ""}, None,
                                               index=index))
            elif echo is not None:
                logprobs = None
                if echo.logprobs is not None:
                    logprobs = _logprobs(state, echo.logprobs, False, 0, as_ids)
                    offsets[index] = sum(map(len, logprobs["tokens"]))
                else:
                    offsets[index] = len(echo.text)
                yield _sse(protocol.completion(request_id, model, echo.text, None, None,
                                               chunk=True, index=index, logprobs=logprobs))
        while len(finished) < len(requests):
            index, output = await outputs.get()
            if output.finish_reason is not None:
                finished[index] = output
            if output.error:  # the last chunk says "abort", then the error itself
                failed = True
                if chat:
                    yield _sse(protocol.chat_chunk(request_id, model, {}, "abort", index=index))
                else:
                    yield _sse(protocol.completion(request_id, model, "", "abort", None,
                                                   chunk=True, index=index))
                error = _failure(state, output)
                state.metrics.error(error.status)  # the 200 was sent: count what it became
                yield _sse(protocol.error_body(error.message, error.kind))
                break
            entries = _entries(output) if wants_logprobs else None
            if not output.text and not entries and output.finish_reason is None:
                continue
            logprobs = _logprobs(state, entries, chat, offsets[index], as_ids)
            if logprobs is not None and not chat:
                offsets[index] += sum(map(len, logprobs["tokens"]))
            if chat and tool_names is not None:
                held[index] += output.text
                if output.finish_reason is None:
                    continue
                for delta, reason in _tool_deltas(held[index], tool_names,
                                                  output.finish_reason):
                    yield _sse(protocol.chat_chunk(request_id, model, delta, reason,
                                                   index=index, logprobs=logprobs))
                    logprobs = None
            elif chat:
                delta = {"content": output.text} if output.text else {}
                yield _sse(protocol.chat_chunk(request_id, model, delta, output.finish_reason,
                                               index=index, logprobs=logprobs))
            else:
                yield _sse(protocol.completion(request_id, model, output.text,
                                               output.finish_reason, None, chunk=True,
                                               index=index, logprobs=logprobs))
        if include_usage and not failed:
            counts = protocol.usage(finished[0].prompt_tokens,
                                    sum(o.completion_tokens for o in finished.values()),
                                    finished[0].cached_tokens)
            if chat:
                yield _sse(protocol.chat_chunk(request_id, model, None, None, counts))
            else:
                body = protocol.completion(request_id, model, "", None, counts, chunk=True)
                body["choices"] = []
                yield _sse(body)
        yield "data: [DONE]\n\n"
    finally:
        if len(finished) < len(requests):  # the client went away (or the server is stopping)
            for request in requests:
                scheduler.abort(request.id)
