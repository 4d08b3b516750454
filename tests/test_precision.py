"""Adaptive precision (jaxinfer.serving.router.PrecisionRoute): one name served from a float
and an int8 copy of the tiny model; each request lands on the copy its `precision` (or the
auto policy) picks, says so in its body and header, and equals that copy's own generate()."""

from __future__ import annotations

import re

import httpx
import pytest

import jaxinfer
from jaxinfer.quant.model import param_bytes
from jaxinfer.serving.router import PrecisionRoute, Router
from jaxinfer.serving.server import APIError
from tests.test_router import PROMPTS, TOKENS, checkpoints, serving, start_engine  # noqa: F401
from tests.test_serving_engine import reference

LONG = 6  # prompts of at least this many characters (token ids) go to "fast" under auto


@pytest.fixture(scope="module")
def copies(checkpoints):  # noqa: F811 - the fixture imported above
    return {"high": jaxinfer.load_model(checkpoints["v1"], dtype="float32", progress=False),
            "fast": jaxinfer.load_model(checkpoints["v1"], dtype="float32", quant="int8",
                                        progress=False)}


@pytest.fixture(scope="module")
def references(copies):
    """Each copy's greedy tokens of every prompt, from its own generate()."""
    return {name: [reference(model, p, TOKENS) for p in PROMPTS]
            for name, model in copies.items()}


@pytest.fixture(scope="module")
def url(copies):
    router = Router()
    for name, model in copies.items():
        router.add(f"tiny@{name}", start_engine(name, model))
    router.precision_route("tiny", high="tiny@high", fast="tiny@fast",
                           auto_fast_prompt_chars=LONG)
    with serving(router.app()) as url:
        yield url
    router.stop()


def complete(url, prompt, **fields):
    return httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": prompt, "max_tokens": TOKENS, "temperature": 0,
        "return_tokens_as_token_ids": True, "logprobs": 0, **fields})


def tokens_of(answer) -> list[int]:
    spelled = answer.json()["choices"][0]["logprobs"]["tokens"]
    return [int(t.removeprefix("token_id:")) for t in spelled]


def test_the_copies_differ_in_format_and_memory(copies):
    high, fast = (param_bytes(copies[k].params) for k in ("high", "fast"))
    assert fast < 0.45 * high  # int8 values + float32 scales against float32 weights


@pytest.mark.numerics
@pytest.mark.parametrize("asked", ["high", "fast"])
def test_a_request_asking_for_a_precision_gets_that_copy_and_its_generate_output(
        url, references, asked):
    for prompt, expected in zip(PROMPTS, references[asked], strict=True):
        answer = complete(url, prompt, precision=asked)
        assert answer.status_code == 200, answer.text
        assert answer.json()["precision"] == asked
        assert answer.headers["x-jaxinfer-precision"] == asked
        assert answer.headers["x-jaxinfer-model"] == f"tiny@{asked}"
        assert tokens_of(answer) == expected


@pytest.mark.numerics
def test_auto_sends_long_prompts_to_fast_and_short_ones_to_high(url, references):
    for index, prompt in enumerate(PROMPTS):
        expected = "fast" if len(prompt) >= LONG else "high"
        for answer in (complete(url, prompt), complete(url, prompt, precision="auto")):
            assert answer.json()["precision"] == expected
            assert tokens_of(answer) == references[expected][index]
    assert {len(p) >= LONG for p in PROMPTS} == {True, False}  # both classes were exercised


def test_streams_say_their_precision_in_a_header_and_metrics_count_both_classes(url):
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": PROMPTS[1], "max_tokens": 2, "stream": True,
            "precision": "fast"}) as stream:
        assert stream.headers["x-jaxinfer-precision"] == "fast"
        assert "[DONE]" in stream.read().decode()
    metrics = httpx.get(f"{url}/metrics").text
    counts = dict(re.findall(r'jaxinfer:precision_requests_total{[^}]*asked="fast"[^}]*'
                             r'precision="(\w+)"} (\S+)', metrics))
    assert float(counts["fast"]) >= 1 and "high" not in counts


def test_an_unknown_precision_is_refused_with_the_allowed_ones(url):
    answer = complete(url, PROMPTS[0], precision="turbo")
    assert answer.status_code == 400
    assert "['auto', 'high', 'fast']" in answer.json()["error"]["message"]


def test_auto_under_load_goes_fast():
    route = PrecisionRoute("m", "m@high", "m@fast", auto_fast_load=4)
    assert route.pick("auto", 1, high_load=3) == "high"
    assert route.pick(None, 1, high_load=4) == "fast"
    assert route.pick("high", 10_000, high_load=100) == "high"  # asked for: always honoured
    with pytest.raises(APIError):
        route.pick(7, 1, 0)
