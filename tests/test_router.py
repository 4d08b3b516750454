"""Several models behind one server (jaxinfer.serving.router): routing by `model`, A/B splits,
weight updates under concurrent streams, and a real Prometheus scraping the live server for
every query of deploy/grafana/jaxinfer.json.

Two tiny random llama models (different weights, SmolLM2's tokenizer) saved as Orbax
checkpoints stand for two versions; the references are jaxinfer.generate on each.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest

import jaxinfer
from jaxinfer.checkpoints import gguf_vocab, orbax
from jaxinfer.serving import EngineConfig
from jaxinfer.serving.engine import Engine
from jaxinfer.serving.router import Route, Router
from jaxinfer.serving.server import ServerState, create_app
from tests.test_serving_engine import reference

uvicorn = pytest.importorskip("uvicorn")

CONFIG = EngineConfig(max_batch_size=4, max_seq_len=64, page_size=8, num_pages=40,
                      decode_steps=3, max_queue_size=128)
KEY = "test-key"
PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 8], [77, 78], [10, 20, 30, 40, 50]]
TOKENS = 12
ROOT = Path(__file__).resolve().parent.parent


def load_model(_name: str, path: str) -> jaxinfer.Model:
    return jaxinfer.load_model(path, dtype="float32", progress=False)


def start_engine(_name: str, model) -> Engine:
    engine = Engine(model, CONFIG)
    engine.warmup()
    return engine


@pytest.fixture(scope="module")
def checkpoints(tiny_cfg, smollm2_path, tmp_path_factory):
    """Two versions of the tiny model as Orbax checkpoints, and a third of other shapes."""
    tokenizer = gguf_vocab.build(smollm2_path)
    from jaxinfer.models import llama

    paths = {}
    wide = dataclasses.replace(tiny_cfg, mlp_dim=256)
    for name, seed, cfg in (("v1", 0, tiny_cfg), ("v2", 1, tiny_cfg), ("wide", 0, wide)):
        params = llama.init_params(cfg, jax.random.key(seed))
        # At init scale the tiny model repeats its last token; 8x makes continuations vary.
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x if "norm" in jax.tree_util.keystr(p) else x * 8, params)
        paths[name] = str(orbax.save(tmp_path_factory.mktemp(name), cfg, params, tokenizer))
    return paths


@pytest.fixture(scope="module")
def references(checkpoints):
    """Greedy tokens and text of every prompt under v1 and v2 (near-ties ruled out)."""
    out = {}
    for version in ("v1", "v2"):
        model = jaxinfer.load_model(checkpoints[version], dtype="float32", progress=False)
        out[version] = [model.tokenizer.decode(reference(model, p, TOKENS)) for p in PROMPTS]
    assert out["v1"] != out["v2"]  # the versions are told apart by their answers
    return out


@contextlib.contextmanager
def serving(app):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def router(checkpoints):
    router = Router(load_model, start_engine, api_key=KEY, drain_timeout_s=120)
    for name, version in (("tiny-a", "v1"), ("tiny-b", "v2")):
        router.add(name, start_engine(name, load_model(name, checkpoints[version])))
    router.route("chat", {"tiny-a": 90, "tiny-b": 10})
    yield router
    router.stop()


@pytest.fixture(scope="module")
def url(router):
    with serving(router.app()) as url:
        yield url


def post(url, path, body, **kwargs):
    headers = {"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=120, **kwargs)


def complete(url, model, prompt, headers=None, **fields):
    return post(url, "/v1/completions", {"model": model, "prompt": prompt,
                                         "max_tokens": TOKENS, "temperature": 0, **fields},
                headers=headers or {})


# -- several models -------------------------------------------------------------------------

def test_models_lists_every_model_and_route(url):
    response = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    cards = {c["id"]: c for c in response.json()["data"]}
    assert set(cards) == {"tiny-a", "tiny-b", "chat"}
    assert cards["tiny-a"]["version"] == "1" and cards["tiny-a"]["max_model_len"] == 64
    assert cards["chat"]["routes"] == {"tiny-a": 90, "tiny-b": 10}
    assert httpx.get(f"{url}/v1/models").status_code == 401  # the API key covers it


def test_each_model_answers_as_generate_does(url, references):
    for name, version in (("tiny-a", "v1"), ("tiny-b", "v2")):
        for prompt, expected in zip(PROMPTS, references[version], strict=True):
            response = complete(url, name, prompt)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == expected
            assert response.json()["model"] == name
            assert response.headers["x-jaxinfer-model"] == name
            assert response.headers["x-jaxinfer-model-version"] == "1"


def test_an_unknown_model_gets_404_with_the_list(url):
    response = complete(url, "tiny-c", [1, 2])
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    for name in ("tiny-a", "tiny-b", "chat"):
        assert name in error["message"]
    assert httpx.get(f"{url}/health").status_code == 200  # and the server carries on


# -- A/B routing ----------------------------------------------------------------------------

def test_a_route_splits_1000_requests_by_weight():
    route = Route("chat", {"a": 90, "b": 10})
    picks = [route.pick(None) for _ in range(1000)]
    assert abs(picks.count("a") / 1000 - 0.9) <= 0.03
    users = [route.pick(f"user-{i}") for i in range(1000)]  # hashed users: within 3 points
    assert abs(users.count("a") / 1000 - 0.9) <= 0.03
    assert {route.pick("alice") for _ in range(50)} == {route.pick("alice")}
    with pytest.raises(ValueError, match="must be > 0"):
        Route("chat", {"a": 0})


def test_routed_requests_split_stick_per_user_and_carry_the_version(url, references):
    def metric(name, **labels):
        text = httpx.get(f"{url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{")
                   and all(f'{k}="{v}"' in line for k, v in labels.items()))

    before = {m: metric("jaxinfer:requests_total", model_name=m) for m in ("tiny-a", "tiny-b")}
    served = []
    for _ in range(20):  # round robin over 90:10: exactly 18 and 2
        response = complete(url, "chat", PROMPTS[1], max_tokens=1)
        served.append(response.headers["x-jaxinfer-model"])
        assert response.json()["model"] == served[-1]
    assert served.count("tiny-a") == 18 and served.count("tiny-b") == 2
    after = {m: metric("jaxinfer:requests_total", model_name=m) for m in ("tiny-a", "tiny-b")}
    assert after["tiny-a"] - before["tiny-a"] == 18 and after["tiny-b"] - before["tiny-b"] == 2
    for user in ("alice", "bob", "carol", "dave"):
        by_field = {complete(url, "chat", PROMPTS[1], max_tokens=1, user=user)
                    .headers["x-jaxinfer-model"] for _ in range(3)}
        by_header = {complete(url, "chat", PROMPTS[1], max_tokens=1,
                              headers={"x-jaxinfer-user": user}).headers["x-jaxinfer-model"]
                     for _ in range(3)}
        assert len(by_field) == 1 and by_field == by_header
    # A routed answer is the chosen version's own.
    response = complete(url, "chat", PROMPTS[0], user="alice")
    version = "v1" if response.headers["x-jaxinfer-model"] == "tiny-a" else "v2"
    assert response.json()["choices"][0]["text"] == references[version][0]


def test_errors_are_counted_by_code_and_model(url):
    def errors(code, model):
        text = httpx.get(f"{url}/metrics").text
        for line in text.splitlines():
            if (line.startswith("jaxinfer:request_errors_total{") and f'code="{code}"' in line
                    and f'model_name="{model}"' in line):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = errors(404, ""), errors(400, "tiny-b"), errors(401, ""), errors(413, "")
    complete(url, "nope", [1])
    assert complete(url, "tiny-b", [1], max_tokens=-1).status_code == 400
    httpx.get(f"{url}/v1/models")
    assert complete(url, "tiny-a", [1] * 3_000_000).status_code == 413
    assert (errors(404, ""), errors(400, "tiny-b"), errors(401, ""), errors(413, "")) == tuple(
        b + 1 for b in before)


# -- weight updates -------------------------------------------------------------------------

def test_a_weight_update_of_other_shapes_gets_400_and_keeps_the_old(url, checkpoints,
                                                                     references):
    path = "/v1/admin/models/tiny-a/weights"
    response = post(url, path, {"path": checkpoints["wide"]})
    assert response.status_code == 400, response.text
    assert "shapes differ" in response.json()["error"]["message"]
    assert "kept" in response.json()["error"]["message"]
    assert post(url, path, {"path": "/no/such/checkpoint"}).status_code == 400
    assert post(url, path, {"checkpoint": 1}).status_code == 400
    assert httpx.post(f"{url}{path}", json={"path": checkpoints["v2"]}).status_code == 401
    assert complete(url, "tiny-a", PROMPTS[0]).json()["choices"][0]["text"] == \
        references["v1"][0]


def live_bytes() -> int:
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays())


@pytest.mark.numerics
def test_weights_replaced_under_concurrent_streams(url, router, checkpoints, references):
    """16 streams in flight (4 slots: most wait in the queue) while tiny-a's weights become
    v2's: none fails or is cut short, each is wholly v1's or v2's answer, requests after the
    update get v2, and the old engine is freed."""
    old_engine = weakref.ref(router.states["tiny-a"].scheduler.engine)
    before = live_bytes()
    expected = {v: dict(zip(map(tuple, PROMPTS), references[v], strict=True))
                for v in ("v1", "v2")}

    async def stream(client, prompt):
        body = {"model": "tiny-a", "prompt": prompt, "max_tokens": TOKENS, "temperature": 0,
                "stream": True}
        text, done, finish = [], False, None
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    text.append(event["choices"][0]["text"])
                    finish = event["choices"][0]["finish_reason"] or finish
        assert done and finish in ("stop", "length")
        return tuple(prompt), "".join(text)

    async def run():
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(timeout=300, headers=headers) as client:
            streams = [asyncio.ensure_future(stream(client, PROMPTS[i % 3])) for i in range(16)]
            await asyncio.sleep(0.3)  # the first ones are decoding
            update = await client.post(f"{url}/v1/admin/models/tiny-a/weights",
                                       json={"path": checkpoints["v2"]})
            more = [asyncio.ensure_future(stream(client, PROMPTS[i % 3])) for i in range(4)]
            return update, await asyncio.gather(*streams), await asyncio.gather(*more)

    update, during, after = asyncio.run(run())
    assert update.status_code == 200, update.text
    assert update.json()["version"] == "2" and update.json()["aborted_requests"] == 0
    versions = []
    for prompt, text in during:
        assert text in (expected["v1"][prompt], expected["v2"][prompt])
        versions.append("v1" if text == expected["v1"][prompt] else "v2")
    assert "v1" in versions  # the update overlapped requests on the old weights
    assert all(text == expected["v2"][prompt] for prompt, text in after)
    cards = {c["id"]: c for c in httpx.get(
        f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]}
    assert cards["tiny-a"]["version"] == "2"
    assert complete(url, "tiny-a", PROMPTS[0]).headers["x-jaxinfer-model-version"] == "2"
    metrics = httpx.get(f"{url}/metrics").text
    assert 'jaxinfer:num_requests_running{model_name="tiny-a",model_version="2"}' in metrics
    assert 'num_requests_running{model_name="tiny-a",model_version="1"}' not in metrics
    gc.collect()
    assert old_engine() is None  # the old weights and page pool are gone
    assert live_bytes() <= before * 1.02  # one copy again


# -- Prometheus and the Grafana dashboard ---------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prometheus_scrapes_the_server_and_every_dashboard_query_has_data(url, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        # A skip, loudly, not a failure: a machine where apt-get cannot run (not root) must
        # still be able to run the rest of the suite.
        pytest.skip("no prometheus binary: `make install-test` installs Debian's package "
                    "(apt-get install prometheus, as root)")
    complete(url, "chat", PROMPTS[0], user="x")  # traffic before and during the scrapes
    complete(url, "nope", [1])
    port = _free_port()
    host = url.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - {{job_name: jaxinfer, metrics_path: /metrics, static_configs: "
        f"[{{targets: ['{host}']}}]}}\n")
    process = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        def query(expr: str) -> list:
            answer = httpx.get(f"{api}/query", params={"query": expr}, timeout=10).json()
            assert answer["status"] == "success", (expr, answer)
            return answer["data"]["result"]

        deadline = time.monotonic() + 60
        while True:  # up, and scraped for long enough that rate() has two samples
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            with contextlib.suppress(httpx.HTTPError, AssertionError, KeyError):
                if query('count_over_time(up{job="jaxinfer"}[1m]) >= 4'):
                    break
            assert time.monotonic() < deadline, "Prometheus did not scrape the server"
            time.sleep(0.5)
        assert query('up{job="jaxinfer"}')[0]["value"][1] == "1"
        complete(url, "tiny-b", PROMPTS[2])
        time.sleep(2)
        dashboard = json.loads((ROOT / "deploy" / "grafana" / "jaxinfer.json").read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
        empty = [expr for expr in exprs if not query(expr)]
        assert not empty, f"dashboard queries without data: {empty}"
        versions = {s["metric"].get("model_version") for s in query(exprs[0])}
        assert "1" in versions or "2" in versions
        rates = query('sum by (model_name) (rate(jaxinfer:generation_tokens_total[1m]))')
        assert {"tiny-a", "tiny-b"} <= {s["metric"]["model_name"] for s in rates}
        assert np.isfinite(float(query("jaxinfer:kv_cache_usage_perc")[0]["value"][1]))
    finally:
        process.terminate()
        process.wait(timeout=30)


# -- the launcher ---------------------------------------------------------------------------

def test_the_launcher_serves_a_models_file_and_drains_on_sigterm(checkpoints, references,
                                                                  tmp_path):
    models_file = tmp_path / "models.toml"
    models_file.write_text(
        f'[models.tiny-a]\npath = "{checkpoints["v1"]}"\n\n'
        f'[models.tiny-b]\npath = "{checkpoints["v2"]}"\n\n'
        '[routes]\nchat = { tiny-a = 1, tiny-b = 1 }\n')
    port = _free_port()
    log_path = tmp_path / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxinfer.launch.serve", f"--port={port}",
         f"--models_file={models_file}", f"--api_key={KEY}", "--dtype=float32",
         "--max_batch_size=4", "--max_seq_len=64", "--page_size=8", "--num_pages=40",
         "--decode_steps=3", "--drain_timeout_s=5"],
        stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server never became healthy"
            time.sleep(0.25)
        cards = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert [c["id"] for c in cards.json()["data"]] == ["tiny-a", "tiny-b", "chat"]
        for name, version in (("tiny-a", "v1"), ("tiny-b", "v2")):
            response = complete(url, name, PROMPTS[0])
            assert response.json()["choices"][0]["text"] == references[version][0]
        assert {complete(url, "chat", PROMPTS[0], max_tokens=1).headers["x-jaxinfer-model"]
                for _ in range(2)} == {"tiny-a", "tiny-b"}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# -- behind a round-robin balancer ----------------------------------------------------------

def test_a_draining_server_behind_round_robin_loses_no_request(checkpoints, references):
    """Two servers behind a round-robin balancer that health-checks /health and retries a 503
    elsewhere (what nginx, HAProxy or a Service do): one server drains mid-traffic; requests
    it had finish there, new ones go to the other, none fails."""
    states = [ServerState("tiny-a") for _ in range(2)]
    for state in states:
        state.attach(start_engine("tiny-a", load_model("tiny-a", checkpoints["v1"])))
    expected = dict(zip(map(tuple, PROMPTS), references["v1"], strict=True))
    with serving(create_app(states[0])) as first, serving(create_app(states[1])) as second:
        backends, turn, served = [first, second], itertools.count(), []

        async def balanced(client, prompt):
            while True:  # round robin over the healthy backends; a 503 is retried elsewhere
                url = backends[next(turn) % 2]
                if (await client.get(f"{url}/health")).status_code != 200:
                    continue
                body = {"model": "tiny-a", "prompt": prompt, "max_tokens": TOKENS,
                        "temperature": 0}
                response = await client.post(f"{url}/v1/completions", json=body)
                if response.status_code == 503:
                    continue
                assert response.status_code == 200, response.text
                served.append(url)
                return tuple(prompt), response.json()["choices"][0]["text"]

        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                early = [asyncio.ensure_future(balanced(client, PROMPTS[i % 3]))
                         for i in range(8)]
                await asyncio.sleep(0.2)
                drain = asyncio.ensure_future(states[0].drain(60))
                late = [asyncio.ensure_future(balanced(client, PROMPTS[i % 3]))
                        for i in range(8)]
                return await drain, await asyncio.gather(*early, *late)

        aborted, answers = asyncio.run(run())
    assert aborted == 0  # the draining server finished what it had
    assert all(text == expected[prompt] for prompt, text in answers)
    assert served.count(first) >= 1 and served.count(second) >= 8
    states[1].scheduler.stop(timeout=30)
