"""Several models behind one server: routing by the request's `model`, A/B splits of a routed
name between versions, and weight updates without downtime. A thin ASGI layer over one
`server.create_app` per model; it parses nothing but the `model` and `user` fields.

    router = Router(load_model, start_engine, api_key="k")
    router.add("smollm2-v1", engine_v1)
    router.add("smollm2-v2", engine_v2)
    router.route("chat", {"smollm2-v1": 90, "smollm2-v2": 10})
    uvicorn.run(router.app())

- `/v1/models` lists every model (with its weights' version) and every routed name; a request
  for any other name gets 404 with that list.
- A routed name picks a version by weight: sticky per user when the request carries `user` (or
  the `x-jaxinfer-user` header), by hashing the user into the weights; otherwise by smooth
  weighted round robin, so N requests split within one request of the weights. The answer
  names the version it came from: its `model` field, and the headers `x-jaxinfer-model` and
  `x-jaxinfer-model-version`; every metric carries `model_name` and `model_version`.
- `POST /v1/admin/models/{name}/weights` with `{"path": ...}` (a GGUF file, a Hugging Face
  directory or an Orbax checkpoint of the same architecture and shapes; the API key required)
  loads the new weights beside the old, warms a second engine on them, and switches at a
  request boundary: requests that arrive after the switch go to the new weights, requests
  dispatched before it (running, queued, or still being tokenized) finish on the old ones (a
  request never mixes versions, and none is refused), then the old engine stops and its
  weights and KV pages are freed. A mismatch answers 400 and keeps the
  old weights. Memory: two copies of the model (and two page pools) during the update.
- A precision route (`router.precision_route("smollm2", high="smollm2@high",
  fast="smollm2@fast")`) serves one name from two copies of a model in different formats
  (float and int8, say): the request's `precision` field picks "high" or "fast"; "auto" (or
  none) picks "fast" for a prompt of at least `auto_fast_prompt_chars` characters or while the
  high copy has `auto_fast_load` or more requests unfinished, else "high". The answer says
  which copy served it: the body's `precision` (non-streaming), the `x-jaxinfer-precision`
  header, and `jaxinfer:precision_requests_total{asked, precision}`. Memory: both copies'
  weights and page pools at once; SmolLM2-135M's weights take 538.1 MB in float32, 136.0 MB
  in int8 (per-channel values and float32 scales) and 111.6 MB as its GGUF blocks (measured
  with `quant.model.param_bytes`), so float + int8 costs 1.25x the float copy alone; each
  copy has its own KV page pool (`kv_cache_gb` each).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import hashlib
import itertools
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import jax
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, generate_latest
from starlette.types import Receive, Scope, Send

from jaxinfer.serving.engine import Engine
from jaxinfer.serving.metrics import count_error
from jaxinfer.serving.screening import Screen
from jaxinfer.serving.server import APIError, ServerState, _BodyLimit, create_app

ADMIN_PREFIX = "/v1/admin/models/"
ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")
USER_HEADER = "x-jaxinfer-user"


class WeightsMismatch(ValueError):
    """New weights whose architecture or shapes differ from the served ones."""


class Route:
    """A routed name's split between versions: `weights` {version: share}, any positive
    numbers (90/10 or 0.9/0.1)."""

    def __init__(self, name: str, weights: dict[str, float]):
        if not weights or any(w <= 0 for w in weights.values()):
            raise ValueError(f"route {name!r}: weights {weights}; each must be > 0")
        self.name, self.weights = name, dict(weights)
        total = sum(weights.values())
        self._cumulative = list(itertools.accumulate(w / total for w in weights.values()))
        self._credit = dict.fromkeys(weights, 0.0)

    def pick(self, user: str | None) -> str:
        versions = list(self.weights)
        if user:  # sticky: the user's hash, uniform in [0, 1), falls in one version's share
            digest = hashlib.blake2b(f"{self.name}\0{user}".encode(), digest_size=8).digest()
            point = int.from_bytes(digest, "little") / 2**64
            return versions[min(bisect.bisect_right(self._cumulative, point), len(versions) - 1)]
        # Smooth weighted round robin (nginx's): exact shares, versions interleaved.
        total = sum(self.weights.values())
        for version, weight in self.weights.items():
            self._credit[version] += weight
        chosen = max(self._credit, key=self._credit.__getitem__)
        self._credit[chosen] -= total
        return chosen


class PrecisionRoute:
    """A name served by two copies of one model: `high` (the float one) and `fast` (the
    quantized one); module doc for the "auto" policy (None turns a criterion off)."""

    CLASSES = ("auto", "high", "fast")

    def __init__(self, name: str, high: str, fast: str, auto_fast_prompt_chars: int | None = None,
                 auto_fast_load: int | None = None):
        self.name, self.copies = name, {"high": high, "fast": fast}
        self.auto_fast_prompt_chars, self.auto_fast_load = auto_fast_prompt_chars, auto_fast_load

    def pick(self, asked: Any, prompt_chars: int, high_load: int) -> str:
        """The class ("high" or "fast") a request asking for `asked` goes to."""
        if asked is None:
            asked = "auto"
        if asked not in self.CLASSES:
            raise APIError(400, f"precision is {asked!r}; it must be one of {list(self.CLASSES)}",
                           param="precision")
        if asked != "auto":
            return asked
        long_prompt = (self.auto_fast_prompt_chars is not None
                       and prompt_chars >= self.auto_fast_prompt_chars)
        busy = self.auto_fast_load is not None and high_load >= self.auto_fast_load
        return "fast" if long_prompt or busy else "high"


class Router:
    """The models of one server, their routed names, and their weight updates.

    A weight update calls `load_model(name, path) -> Model` for the new weights, checks them
    against the served ones, then `start_engine(name, model) -> Engine` (warmed up), both on
    a worker thread. Without them the server cannot update weights (501).
    """

    def __init__(self, load_model: Callable[[str, str], Any] | None = None,
                 start_engine: Callable[[str, Any], Engine] | None = None, *,
                 api_key: str | None = None, max_body_bytes: int = 4 * 2**20,
                 drain_timeout_s: float = 600.0, screen: Screen | None = None):
        self.load_model, self.start_engine = load_model, start_engine
        self.screen = screen  # every model's input screening (serving.screening)
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        self.drain_timeout_s = drain_timeout_s  # how long an update waits for old requests
        self.registry = CollectorRegistry()  # one /metrics page for every model and version
        self.states: dict[str, ServerState] = {}
        self.apps: dict[str, Any] = {}
        self.routes: dict[str, Route] = {}
        self.precision_routes: dict[str, PrecisionRoute] = {}
        self._updating: set[str] = set()
        self._in_flight: collections.Counter[int] = collections.Counter()  # by id(state)
        self.draining = False

    # -- set-up -------------------------------------------------------------------------------

    def add(self, name: str, engine: Engine | None = None, version: str = "1") -> ServerState:
        """Serves a model under `name` (its engine now, or later with `state.attach`)."""
        if name in self.names():
            raise ValueError(f"model {name!r} is given twice")
        state = ServerState(name, api_key=self.api_key, model_version=version,
                            max_body_bytes=self.max_body_bytes, registry=self.registry,
                            screen=self.screen)
        if engine is not None:
            state.attach(engine)
        self.states[name], self.apps[name] = state, create_app(state)
        return state

    def route(self, name: str, weights: dict[str, float]) -> Route:
        if name in self.names():
            raise ValueError(f"routed name {name!r} is already a model or a route")
        if unknown := sorted(set(weights) - set(self.states)):
            raise ValueError(f"route {name!r}: {unknown} are not served models; models: "
                             f"{sorted(self.states)}")
        self.routes[name] = Route(name, weights)
        return self.routes[name]

    def precision_route(self, name: str, high: str, fast: str, **policy) -> PrecisionRoute:
        """Serves `name` from the models `high` and `fast` by each request's `precision`;
        `policy`: PrecisionRoute's auto_fast_prompt_chars and auto_fast_load."""
        if name in self.names():
            raise ValueError(f"precision route {name!r} is already a model or a route")
        if unknown := sorted({high, fast} - set(self.states)):
            raise ValueError(f"precision route {name!r}: {unknown} are not served models")
        self.states[high].precision, self.states[fast].precision = "high", "fast"
        self.precision_routes[name] = PrecisionRoute(name, high, fast, **policy)
        return self.precision_routes[name]

    def names(self) -> list[str]:
        return [*self.states, *self.routes, *self.precision_routes]

    def resolve(self, model: str, user: str | None, body: dict | None = None) -> str:
        """The served model a request for `model` (with JSON `body`) goes to."""
        if model in self.routes:
            return self.routes[model].pick(user)
        if model in self.precision_routes:
            route = self.precision_routes[model]
            high = self.states[route.copies["high"]].scheduler
            load = high.num_unfinished if high is not None else 0
            body = body or {}
            return route.copies[route.pick(body.get("precision"), _prompt_chars(body), load)]
        if model not in self.states:
            raise APIError(404, f"model {model!r} does not exist; this server serves "
                           f"{self.names()}", param="model", code="model_not_found")
        return model

    @property
    def ready(self) -> bool:
        return not self.draining and all(s.ready for s in self.states.values())

    async def drain(self, timeout_s: float) -> int:
        self.draining = True
        counts = await asyncio.gather(*(s.drain(timeout_s) for s in self.states.values()))
        return sum(counts)

    def stop(self, timeout: float = 10) -> None:
        for state in self.states.values():
            if state.scheduler is not None:
                state.scheduler.stop(timeout=timeout)

    # -- weight updates -----------------------------------------------------------------------

    async def update_weights(self, name: str, path: str, version: str | None = None) -> dict:
        """Replaces model `name`'s weights by those at `path` without downtime (module doc)."""
        if name not in self.states:
            raise APIError(404, f"model {name!r} does not exist; models: {sorted(self.states)}",
                           param="name", code="model_not_found")
        if self.load_model is None or self.start_engine is None:
            raise APIError(501, "this server was started without a weight loader",
                           "server_error")
        if name in self._updating:
            raise APIError(409, f"model {name!r} is already being updated", code="conflict")
        self._updating.add(name)
        try:
            old = self.states[name]
            old.require_ready()
            try:
                model = await asyncio.to_thread(self.load_model, name, path)
                check_same_shapes(old.scheduler.engine, model)
            except (WeightsMismatch, FileNotFoundError, ValueError) as e:
                raise APIError(400, f"cannot load {path!r} into model {name!r}: {e}; the "
                               f"served weights (version {old.model_version}) are kept",
                               param="path") from e
            engine = await asyncio.to_thread(self.start_engine, name, model)
            del model  # the engine holds the weights now
            version = version or _next_version(old.model_version)
            state = ServerState(name, api_key=self.api_key, model_version=version,
                                max_body_bytes=self.max_body_bytes, registry=self.registry,
                                created=old.created, screen=old.screen,
                                precision=old.precision)
            state.attach(engine)
            # The switch: the next request dispatched finds the new app (a request boundary).
            self.states[name], self.apps[name] = state, create_app(state)
            aborted = await self._retire(old)
            old.metrics.retire()
            old.scheduler = None  # the old engine's weights and pages go with the last ref
            return {"id": name, "object": "model", "version": version,
                    "previous_version": old.model_version, "aborted_requests": aborted}
        finally:
            self._updating.discard(name)

    async def _retire(self, old: ServerState) -> int:
        """Waits for the requests dispatched to `old` to end (those still being tokenized
        included, so none is refused), then stops its engine; returns how many it cut."""
        deadline = time.monotonic() + self.drain_timeout_s
        while self._in_flight[id(old)] > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._in_flight.pop(id(old), None)
        unfinished = old.scheduler.num_unfinished
        await asyncio.to_thread(old.scheduler.stop, 30, "the model's weights were replaced")
        return unfinished

    # -- ASGI ---------------------------------------------------------------------------------

    def app(self):
        """The ASGI app: the router behind the body-size limit."""
        return _BodyLimit(self, self.max_body_bytes, metrics=self)

    def error(self, status: int) -> None:
        """Counts an error answered before a model was chosen (the body limit calls it)."""
        count_error(self.registry, status)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await next(iter(self.apps.values()))(scope, receive, send)
        path, method = scope["path"], scope["method"]
        try:
            if path == "/health":
                ready = self.ready
                body = {"status": "ok" if ready else "draining" if self.draining else
                        "not ready"}
                return await JSONResponse(body, 200 if ready else 503)(scope, receive, send)
            if path == "/metrics":
                return await _text(generate_latest(self.registry))(scope, receive, send)
            if path == "/v1/models" and method == "GET":
                self._authorize(scope)
                return await JSONResponse(self.model_list())(scope, receive, send)
            if path.startswith(ADMIN_PREFIX) and path.endswith("/weights") and method == "POST":
                self._authorize(scope, admin=True)
                name = path[len(ADMIN_PREFIX):-len("/weights")]
                body = _json_object(await _read_body(receive))
                if not isinstance(body.get("path"), str):
                    raise APIError(400, 'the body must be {"path": "<checkpoint>"} (and an '
                                   'optional "version")', param="path")
                answer = await self.update_weights(name, body["path"], body.get("version"))
                return await JSONResponse(answer)(scope, receive, send)
            if path in ROUTED_PATHS and method == "POST":
                return await self._dispatch(scope, receive, send)
        except APIError as error:
            self.error(error.status)
            return await error.response()(scope, receive, send)
        return await next(iter(self.apps.values()))(scope, receive, send)

    def model_list(self) -> dict:
        cards = []
        for name, state in self.states.items():
            card = {"id": name, "object": "model", "created": state.created,
                    "owned_by": "jaxinfer", "version": state.model_version}
            if state.scheduler is not None:
                card["max_model_len"] = state.scheduler.context
            cards.append(card)
        for name, route in self.routes.items():
            cards.append({"id": name, "object": "model", "created": 0, "owned_by": "jaxinfer",
                          "routes": route.weights})
        for name, route in self.precision_routes.items():
            cards.append({"id": name, "object": "model", "created": 0, "owned_by": "jaxinfer",
                          "precision": route.copies})
        return {"object": "list", "data": cards}

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await _read_body(receive)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str):  # the first model's app says what is wrong
            app = next(iter(self.apps.values()))
            return await app(scope, _replay(raw, receive), send)
        headers = dict(scope["headers"])
        user = body.get("user") or headers.get(USER_HEADER.encode(), b"").decode() or None
        served = self.resolve(model, user if isinstance(user, str) else None, body)
        if served != model:  # the served app checks `model` against its own name
            raw = json.dumps({**body, "model": served}).encode()
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"]
                                          if k != b"content-length"]
                     + [(b"content-length", str(len(raw)).encode())]}
        # Read once: a weight update swaps them for later requests, this one stays on these.
        state, app = self.states[served], self.apps[served]

        async def named(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-jaxinfer-model", served.encode())]}
            await send(message)

        self._in_flight[id(state)] += 1
        try:
            await app(scope, _replay(raw, receive), named)
        finally:
            self._in_flight[id(state)] -= 1

    def _authorize(self, scope: Scope, admin: bool = False) -> None:
        if admin and not self.api_key:
            raise APIError(403, "admin endpoints need the server to have an API key "
                           "(--api_key)", "permission_error")
        if self.api_key:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                               "authentication_error", code="invalid_api_key")


def check_same_shapes(served: Engine, new) -> None:
    """Raises WeightsMismatch unless the model `new` has the architecture and parameter shapes
    of the one `served` runs."""
    a, b = served.model_config, new.config
    if a.architecture != b.architecture:
        raise WeightsMismatch(f"architecture {b.architecture!r}, served {a.architecture!r}")
    shapes = [jax.tree_util.tree_flatten_with_path(jax.tree.map(
        lambda x: (tuple(x.shape), str(x.dtype)), e.params))[0] for e in (served, new)]
    served, given = (dict((jax.tree_util.keystr(k), v) for k, v in s) for s in shapes)
    if served != given:
        diff = sorted(set(served.items()) ^ set(given.items()))[:3]
        raise WeightsMismatch(f"parameter shapes differ (first differences, name and "
                              f"(shape, dtype)): {diff}")


def _prompt_chars(body: dict) -> int:
    """The prompt's length in characters (token ids count one each), before tokenizing."""
    prompt = body.get("prompt")
    if isinstance(prompt, (str, list)):
        return len(prompt)
    total = 0
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
    return total


def _next_version(version: str) -> str:
    return str(int(version) + 1) if version.isdigit() else f"{version}+1"


def _text(body: bytes):
    from fastapi.responses import Response

    return Response(body, media_type="text/plain; version=0.0.4")


async def _read_body(receive: Receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def _json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw or b"{}")
    except ValueError as e:
        raise APIError(400, "the request body is not valid JSON") from e
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that yields the body already read, then the client's own messages (so the
    served app still sees a disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
