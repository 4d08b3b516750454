"""The OpenAI-compatible server end to end: real SmolLM2, real uvicorn on localhost, the
official `openai` client. References: jaxinfer.generate / jaxinfer.chat (the dense-cache path)
and the same request sent alone.

One engine configuration serves every in-process server here (8 slots, 128-token context,
32 KV pages of 16 tokens), so its programs compile once; a second server over the same shapes
(a different queue limit, or a loop made to fail) reuses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer.cache import KVCache
from jaxinfer.models import family
from jaxinfer.serving import EngineConfig
from jaxinfer.serving import engine as engine_module
from jaxinfer.serving.engine import Engine
from jaxinfer.serving.server import ServerState, create_app
from tests.numerics import assert_no_near_ties

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

MODEL = "smollm2-135m-instruct"
CONFIG = EngineConfig(max_batch_size=8, max_seq_len=128, page_size=16, num_pages=33,
                      decode_steps=4, max_queue_size=32)
PROMPTS = [  # mixed lengths: three prompt buckets
    "The capital of France is",
    "def fibonacci(n):",
    "List three colors:",
    "Water boils at a temperature of",
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old "
    "clockmaker who",
    "Translate to French: I like apples.",
    "The three laws of motion, as stated by Isaac Newton in his Principia of 1687, describe "
    "the relationship between a body and the forces acting on it. The first law says",
    "1, 2, 3, 4, 5,",
]
_compile_events: list[str] = []


def _count_compile(event: str, *args, **kwargs) -> None:
    """Records traces and compiles on the server's threads (the tests' own references, such
    as jaxinfer.generate, run on the main thread)."""
    compiling = event.startswith("/jax/core/compile/") or event.endswith("use_cache")
    if compiling and threading.current_thread() is not threading.main_thread():
        _compile_events.append(f"{event} on {threading.current_thread().name}")


@contextlib.contextmanager
def serving(state: ServerState):
    """Runs the app on a free localhost port in a background thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        if state.scheduler is not None:
            state.scheduler.stop(timeout=30)


@pytest.fixture(scope="module")
def model(smollm2):
    return smollm2


@pytest.fixture(scope="module")
def server(model):
    """The shared server: /health is checked 503 before the engine is attached."""
    state = ServerState(MODEL)
    with serving(state) as url:
        before = httpx.get(f"{url}/health").status_code
        engine = Engine(model, CONFIG)
        engine.warmup()
        state.attach(engine)
        state.programs_after_warmup = engine_module.compiled_programs()
        jax.monitoring.register_event_listener(_count_compile)
        jax.monitoring.register_event_duration_secs_listener(_count_compile)
        yield url, state, before
    jax.monitoring.clear_event_listeners()


@pytest.fixture(scope="module")
def url(server):
    return server[0]


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def metric(url: str, name: str, **labels) -> float:
    """The value of one sample in /metrics (0 when absent)."""
    text = httpx.get(f"{url}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def greedy(client, prompt: str, max_tokens: int = 12, **extra):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                     temperature=0, **extra)


# -- completions and chat -------------------------------------------------------------------


def test_health_503_before_model_attached_then_200(server):
    url, _, before = server
    assert before == 503
    assert httpx.get(f"{url}/health").status_code == 200


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


@pytest.mark.numerics
def test_completion_equals_generate_greedy(client, model):
    prompt = PROMPTS[0]
    response = greedy(client, prompt, max_tokens=12)
    ids = model.tokenizer.encode(prompt)
    reference = jaxinfer.generate(model.params, [ids], model.config, max_new_tokens=12,
                                  stop_token_ids=model.tokenizer.stop_ids)
    # The server (paged cache, 8 rows) runs other kernels than generate() (dense, 1 row):
    # equal text because generate()'s path has no near-tie (smallest top-2 margin measured:
    # 0.22; logits of different batch sizes differ by ~7e-5 of a range of ~58).
    sequence = ids + reference.tokens[0][:-1]
    logits, _ = family(model.config.architecture).forward(
        model.params, jnp.array([sequence]), jnp.arange(len(sequence))[None],
        KVCache.init(model.config, 1, len(sequence)), model.config)
    assert_no_near_ties(np.asarray(logits[0, len(ids) - 1:]), 1e-3)
    choice = response.choices[0]
    assert choice.text == model.tokenizer.decode(reference.tokens[0])
    assert choice.finish_reason == reference.finish_reasons[0]
    assert response.usage.prompt_tokens == len(ids)
    assert response.usage.completion_tokens == reference.lengths[0]
    assert response.usage.total_tokens == len(ids) + reference.lengths[0]


def test_max_tokens_is_exact(client):
    response = greedy(client, "1, 2, 3, 4, 5,", max_tokens=5)
    assert response.usage.completion_tokens == 5
    assert response.choices[0].finish_reason == "length"


def test_streaming_completion_joins_to_the_whole_answer_and_ends_with_done(client, url):
    whole = greedy(client, PROMPTS[1], max_tokens=16).choices[0].text
    chunks = list(greedy(client, PROMPTS[1], max_tokens=16, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 4, "stream": True}
    raw = httpx.post(f"{url}/v1/completions", json=body, timeout=60).text
    events = [line for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 2


def test_chat_completion_equals_completion_of_the_templated_prompt(client, model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                              temperature=0)
    prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = model.tokenizer.encode(prompt, add_bos=False)
    reference = greedy(client, ids, max_tokens=12)  # token ids: no BOS added again
    assert response.choices[0].message.content == reference.choices[0].text
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason == reference.choices[0].finish_reason
    # The same prompt a second time: its full pages come from the prefix cache.
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert response.usage.model_dump(include=counts) == reference.usage.model_dump(include=counts)
    assert reference.usage.prompt_tokens_details.cached_tokens == (len(ids) - 1) // 16 * 16


def test_streaming_chat_sends_role_deltas_and_usage(client):
    messages = [{"role": "user", "content": "Name a fruit."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                           temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == []
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # the 2nd send hits the cache
    assert chunks[-1].usage.model_dump(include=counts) == whole.usage.model_dump(include=counts)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_stop_string_cuts_the_text_before_it(client):
    free = greedy(client, PROMPTS[4], max_tokens=24).choices[0].text
    words = free.split()
    stop = words[len(words) // 2]
    response = greedy(client, PROMPTS[4], max_tokens=24, stop=[stop])
    assert response.choices[0].text == free[: free.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    # Streamed, text that might begin the stop string is held back, never sent then retracted.
    chunks = list(greedy(client, PROMPTS[4], max_tokens=24, stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == free[: free.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt="My favourite animal is",
                                         max_tokens=6, temperature=1.0, top_p=0.95,
                                         seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1


def test_32_concurrent_greedy_requests_equal_each_sent_alone(url, client):
    # Exact on any machine: alone or not, a row runs through the same compiled programs (the
    # engine's fixed prefill and decode widths), and rows never mix in a product.
    alone = {p: greedy(client, p, max_tokens=8).choices[0].text for p in PROMPTS}
    clients = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                 timeout=300)

    async def burst():
        calls = [clients.completions.create(model=MODEL, prompt=PROMPTS[i % len(PROMPTS)],
                                            max_tokens=8, temperature=0) for i in range(32)]
        return await asyncio.gather(*calls)

    responses = asyncio.run(burst())
    assert len(responses) == 32
    for i, response in enumerate(responses):
        assert response.choices[0].text == alone[PROMPTS[i % len(PROMPTS)]], i


# -- disconnects, metrics, auth -------------------------------------------------------------


def test_client_disconnect_frees_its_slot_and_pages(url):
    aborted = metric(url, "jaxinfer:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 100, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert metric(url, "jaxinfer:num_requests_running") == 1
        assert metric(url, "jaxinfer:kv_cache_usage_perc") > 0
    deadline = time.monotonic() + 20
    while metric(url, "jaxinfer:num_requests_running") or metric(
        url, "jaxinfer:kv_cache_usage_perc"
    ):
        assert time.monotonic() < deadline, "slot or pages still held after the disconnect"
        time.sleep(0.05)
    assert metric(url, "jaxinfer:request_success_total", finished_reason="abort") == aborted + 1


def test_metrics_move_with_traffic(url, client):
    names = ["jaxinfer:prompt_tokens_total", "jaxinfer:generation_tokens_total",
             "jaxinfer:time_to_first_token_seconds_count",
             "jaxinfer:inter_token_latency_seconds_count",
             "jaxinfer:e2e_request_latency_seconds_count"]
    before = {name: metric(url, name) for name in names}
    length = metric(url, "jaxinfer:request_success_total", finished_reason="length")
    response = greedy(client, PROMPTS[2], max_tokens=6)
    after = {name: metric(url, name) for name in names}
    assert after[names[0]] - before[names[0]] == response.usage.prompt_tokens
    assert after[names[1]] - before[names[1]] == 6
    assert after[names[2]] - before[names[2]] == 1
    assert after[names[3]] - before[names[3]] == 5  # gaps between 6 tokens
    assert after[names[4]] - before[names[4]] == 1
    assert metric(url, "jaxinfer:request_success_total", finished_reason="length") == length + 1
    assert metric(url, "jaxinfer:num_requests_waiting") == 0


def test_api_key_is_required_when_set(server, url):
    state = server[1]
    state.api_key = "sesame"
    try:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
        refused = httpx.post(f"{url}/v1/completions", json=body)
        assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"]
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        assert keyed.completions.create(**body).usage.completion_tokens == 1
        assert httpx.get(f"{url}/health").status_code == 200  # health stays open
    finally:
        state.api_key = None


# -- bad input ------------------------------------------------------------------------------

LONG_PROMPT = "word " * 200  # more tokens than the 128-token context

BAD_REQUESTS = {
    "malformed json": ("completions", b'{"model": "x", "prompt": '),
    "body not an object": ("completions", b"[1, 2, 3]"),
    "missing prompt": ("completions", {"model": MODEL}),
    "missing messages": ("chat/completions", {"model": MODEL}),
    "prompt wrong type": ("completions", {"model": MODEL, "prompt": {"text": "hi"}}),
    "max_tokens wrong type": ("completions", {"model": MODEL, "prompt": "hi",
                                              "max_tokens": "ten"}),
    "prompt longer than context": ("completions", {"model": MODEL, "prompt": LONG_PROMPT}),
    "max_tokens past context": ("completions", {"model": MODEL, "prompt": "hi",
                                                "max_tokens": 500}),
    "max_tokens zero": ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}),
    "temperature too high": ("completions", {"model": MODEL, "prompt": "hi",
                                             "temperature": 2.5}),
    "negative temperature": ("chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}),
    "top_p zero": ("completions", {"model": MODEL, "prompt": "hi", "top_p": 0}),
    "top_p above one": ("completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}),
    "unknown model": ("completions", {"model": "gpt-5", "prompt": "hi"}),
    "empty messages": ("chat/completions", {"model": MODEL, "messages": []}),
    "unknown role": ("chat/completions", {
        "model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}),
    "n above 16": ("completions", {"model": MODEL, "prompt": "hi", "n": 17}),
    "empty prompt": ("completions", {"model": MODEL, "prompt": ""}),
    "token id outside vocabulary": ("completions", {"model": MODEL, "prompt": [1, 10**7]}),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_with_an_error_body(url, case):
    path, body = BAD_REQUESTS[case]
    if isinstance(body, bytes):
        response = httpx.post(f"{url}/v1/{path}", content=body,
                              headers={"Content-Type": "application/json"})
    else:
        response = httpx.post(f"{url}/v1/{path}", json=body)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"


def test_context_error_names_both_numbers(url, model):
    body = {"model": MODEL, "prompt": LONG_PROMPT}
    message = httpx.post(f"{url}/v1/completions", json=body).json()["error"]["message"]
    prompt_tokens = len(model.tokenizer.encode(LONG_PROMPT))
    assert f"{prompt_tokens} tokens" in message and "128 tokens" in message


def test_server_still_answers_after_bad_input(client):
    assert greedy(client, "Hello", max_tokens=2).usage.completion_tokens == 2


# -- overload and failures ------------------------------------------------------------------


def test_pages_running_out_preempt_and_resume_requests(url, client):
    preempted = metric(url, "jaxinfer:num_preemptions_total")
    prompt = PROMPTS[6]  # ~45 tokens: 8 such requests of 40 more tokens need 48 of 32 pages
    clients = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                 timeout=300)

    async def burst():
        # Distinct first tokens: no page is shared through the prefix cache.
        calls = [clients.completions.create(model=MODEL, prompt=f"{i}. {prompt}", max_tokens=40,
                                            temperature=0) for i in range(8)]
        return await asyncio.gather(*calls)

    responses = asyncio.run(burst())
    assert metric(url, "jaxinfer:num_preemptions_total") > preempted
    for response in responses:
        assert response.usage.completion_tokens == 40 or response.choices[0].finish_reason \
            == "stop"
    assert metric(url, "jaxinfer:kv_cache_usage_perc") == 0


def test_full_queue_answers_429(model):
    config = EngineConfig(**{**CONFIG.__dict__, "max_queue_size": 2})
    state = ServerState(MODEL)
    with serving(state) as url:
        state.attach(Engine(model, config))  # same shapes: the programs are compiled already
        body = {"model": MODEL, "prompt": "Count to fifty: 1, 2, 3,", "max_tokens": 8}

        async def burst():  # 8 slots + 2 queue places < 14 requests at once
            async with httpx.AsyncClient(timeout=120) as http:
                calls = [http.post(f"{url}/v1/completions", json=body) for _ in range(14)]
                return await asyncio.gather(*calls)

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert 429 in codes and set(codes) <= {200, 429}
        full = next(r for r in responses if r.status_code == 429)
        assert "queue is full" in full.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200


def test_health_503_after_the_engine_loop_dies(model):
    state = ServerState(MODEL)
    with serving(state) as url:
        engine = Engine(model, CONFIG)

        def broken_generate():
            raise RuntimeError("simulated device failure")

        engine.generate = broken_generate
        state.attach(engine)
        assert httpx.get(f"{url}/health").status_code == 200
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 8}
        failed = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert failed.status_code == 503 and "error" in failed.json()
        assert httpx.get(f"{url}/health").status_code == 503
        again = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert again.status_code == 503


def test_no_compilation_after_warmup(server):
    """Every test above (mixed prompt lengths, 32 concurrent, preemption) ran on the
    programs warm-up compiled."""
    assert _compile_events == []
    assert engine_module.compiled_programs() == server[1].programs_after_warmup


# -- the launcher: SIGTERM drains -----------------------------------------------------------


def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path):
    port = _free_port()
    command = [sys.executable, "-m", "jaxinfer.launch.serve", f"--port={port}",
               "--max_batch_size=8", "--max_seq_len=128", "--num_pages=33", "--decode_steps=4",
               "--dtype=float32", "--drain_timeout_s=60",
               "--compile_while_loading=true"]  # warm-up on the weights' shapes, then the weights
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            assert time.monotonic() < deadline, "server never became healthy"
            time.sleep(0.25)
        body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 40, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.HTTPError):  # the listener is closed: no new requests
                httpx.get(f"{url}/health", timeout=5)
            events = [first, *(line for line in lines if line.startswith("data: "))]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert process.wait(timeout=60) == 0
        timeline = (tmp_path / "serve.log").read_text()  # load, each program, ready
        assert "while the weights load" in timeline and "compiled decode" in timeline
        assert "loaded " in timeline and "s after start)" in timeline
    finally:
        if process.poll() is None:
            process.kill()
        log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_launcher_rejects_a_bad_engine_flag_with_the_reason():
    run = subprocess.run([sys.executable, "-m", "jaxinfer.launch.serve", "--max_batch_size=0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "max_batch_size=0" in run.stderr
