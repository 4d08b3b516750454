"""Fuzzing the real SmolLM2 server: no request, however odd, gets a 5xx or leaves the server
unhealthy.

schemathesis reads the server's own /openapi.json and sends bodies that fit the schema and
bodies that break it; hypothesis throws random JSON values (NaN, huge integers, lone
surrogates, nested arrays and objects) at every field of both endpoints. Examples are
bounded and derandomized, and requests that would really generate are kept to a few tokens.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from test_serving import CONFIG, MODEL, metric, serving

from jaxinfer.serving.engine import Engine
from jaxinfer.serving.server import ServerState

FEW_TOKENS = 2  # generating requests are kept this short
TOKEN_LIMITS = ("max_tokens", "max_completion_tokens")
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def url(smollm2):
    state = ServerState(MODEL)
    with serving(state) as base:
        engine = Engine(smollm2, CONFIG)  # test_serving's shapes: compiled once per session
        engine.warmup()
        state.attach(engine)
        yield base


def assert_healthy(url: str) -> None:
    assert httpx.get(f"{url}/health").status_code == 200
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.json()["usage"]["completion_tokens"] == 2
    assert metric(url, "jaxinfer:num_requests_running") == 0


def _short(body) -> None:
    """Caps what a generating request asks for, so the fuzzing stays within its time."""
    if not isinstance(body, dict):
        return
    limits = [body.get(name) for name in TOKEN_LIMITS]
    if not any(isinstance(v, int) and not isinstance(v, bool) for v in limits):
        body["max_tokens"] = FEW_TOKENS  # chat would generate to the end of the context
    for name, value in zip(TOKEN_LIMITS, limits, strict=True):
        if isinstance(value, int) and FEW_TOKENS < value < CONFIG.max_seq_len:
            body[name] = FEW_TOKENS


# -- schemathesis: the OpenAPI schema's requests, valid and invalid ---------------------------


@pytest.fixture(scope="module")
def schema_cases(url):
    """Cases for every POST operation of /openapi.json, fitting the schema and breaking it.
    (Drawn with hypothesis directly: schemathesis' pytest plugin does not run on pytest 9.)"""
    schemathesis = pytest.importorskip("schemathesis")
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json").include(method="POST")
    return st.one_of(schema.as_strategy(mode) for mode in schemathesis.GenerationMode)


@given(data=st.data())
@FUZZ
def test_schemathesis_finds_no_5xx(schema_cases, data):
    case = data.draw(schema_cases)
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = MODEL  # the real name, so that valid bodies reach the engine
    _short(case.body)
    response = case.call(timeout=120)
    assert response.status_code < 500, (case.body, response.text)


# -- hypothesis: random JSON values in every field -------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers() | st.floats()  # NaN, infinities too
           | st.text(st.characters(exclude_categories=()), max_size=12))  # lone surrogates too
JSON_VALUES = SCALARS | st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=8,
)
# Tried in every field besides the random ones: where int32, uint32 and int64 end, and text
# no tokenizer can encode.
EDGES = [2**31, -(2**31) - 1, 2**32, 2**63, -(2**63) - 1, 2**64, [2**40], "\ud800", [float("nan")]]
SHARED_FIELDS = ["model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                 "stop", "stop_token_ids", "stream", "stream_options", "n", "presence_penalty",
                 "frequency_penalty", "user", "logit_bias", "logprobs"]
BASES = {
    "completions": {"model": MODEL, "prompt": "Hi", "max_tokens": 1},
    "chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                         "max_tokens": 1},
}
FIELDS = [("completions", f) for f in [*SHARED_FIELDS, "prompt", "echo", "suffix"]] + [
    ("chat/completions", f) for f in [*SHARED_FIELDS, "messages", "max_completion_tokens",
                                      "top_logprobs", "tools", "message role",
                                      "message content"]]


def _with_edges(test):
    for value in EDGES:
        test = example(value=value)(test)
    return test


@pytest.mark.parametrize(("path", "field"), FIELDS)
@_with_edges
@given(value=JSON_VALUES)
@settings(FUZZ, max_examples=3)
def test_random_json_in_any_field_gets_no_5xx(url, path, field, value):
    if field in TOKEN_LIMITS:  # a valid limit (or none) would really generate: keep to one
        generates = isinstance(value, int) and 1 < value < CONFIG.max_seq_len
        assume(value is not None and not generates)
    body = json.loads(json.dumps(BASES[path]))
    if field.startswith("message "):
        body["messages"][0][field.split()[1]] = value
    else:
        body[field] = value
    response = httpx.post(f"{url}/v1/{path}", content=json.dumps(body),
                          headers={"Content-Type": "application/json"}, timeout=120)
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert response.json()["error"]["message"]


def test_the_server_is_healthy_after_fuzzing(url):
    assert_healthy(url)
