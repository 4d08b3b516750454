"""The serving engine and scheduler on the tiny random model: the engine API against
jaxinfer.generate, the page allocator, prefill batching with a queue delay, preemption.

The tokenizer is SmolLM2's (ids 0..255 of its vocabulary are the tiny model's whole
vocabulary), so detokenizing and stop ids run for real.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import jax
import numpy as np
import pytest

import jaxinfer
from jaxinfer.api import weight_shapes
from jaxinfer.cache import KVCache
from jaxinfer.checkpoints import gguf_vocab
from jaxinfer.models import family, llama
from jaxinfer.sampling import SamplingParams
from jaxinfer.serving import EngineConfig
from jaxinfer.serving import engine as engine_module
from jaxinfer.serving.engine import NO_TOKEN, Engine, PrefillRow, prefill_buckets
from jaxinfer.serving.pages import PageTable
from jaxinfer.serving.scheduler import Output, QueueFull, Request, Scheduler
from tests.conftest import TINY
from tests.numerics import assert_no_near_ties

# 13 usable pages of 8 tokens: less than 4 slots of 64 tokens need, so requests can be preempted.
CONFIG = EngineConfig(max_batch_size=4, max_seq_len=64, page_size=8, num_pages=14,
                      decode_steps=3, max_queue_size=8)
PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 8], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3],
           [77, 78], [10, 20, 30, 40, 50]]


@pytest.fixture(scope="module")
def tiny_model(tiny_cfg, tiny_params, smollm2_path):
    # At init scale the tiny model repeats its last token forever; weights 8x larger make
    # its greedy continuations vary, so comparing them means something.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * 8, tiny_params
    )
    return jaxinfer.Model(tiny_cfg, params, gguf_vocab.build(smollm2_path))


# The engine (paged cache, 4 slots) runs other kernels than generate() (dense cache, 1 row):
# logits differ by up to 4e-6 here (range ~10). Its greedy tokens equal generate()'s because
# every reference path is checked to have no near-tie at this tolerance (smallest top-2
# margin measured: 9.7e-4, over the prompts below and the preemption test's).
ENGINE_ATOL = 1e-4


def reference(model, prompt, n, sampling=None):
    result = jaxinfer.generate(model.params, [prompt], model.config, max_new_tokens=n,
                               sampling=sampling, stop_token_ids=model.tokenizer.stop_ids)
    tokens = result.tokens[0]
    if sampling is None:  # greedy: the engine's tokens can equal these only without near-ties
        sequence = prompt + tokens[:-1]
        logits, _ = family(model.config.architecture).forward(
            model.params, np.array([sequence]), np.arange(len(sequence))[None],
            KVCache.init(model.config, 1, len(sequence)), model.config)
        assert_no_near_ties(np.asarray(logits[0, len(prompt) - 1:]), ENGINE_ATOL)
    return tokens


class Driver:
    """The engine driven by hand, as the scheduler drives it: a page table and the state."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.pages = PageTable(engine.num_pages, engine.page_size, engine.slots,
                               engine.pages_per_seq)
        self.state = engine.init_state()

    def start(self, slot: int, prompt, n: int, sampling=None, stop_ids=None) -> int:
        """Prefills `prompt` into `slot` with pages for n new tokens; returns the first token."""
        engine = self.engine
        stop_ids = engine.tokenizer.stop_ids if stop_ids is None else stop_ids
        pages = self.pages.allocate(self.pages.pages_for(len(prompt) + n))
        row = PrefillRow(prompt, pages, sampling or SamplingParams(), max_tokens=n,
                         stop_ids=stop_ids)
        prefix = engine.prefill([row])
        self.pages.assign(slot, pages)
        self.state = engine.insert(prefix, self.state, slot)
        return prefix.tokens[0]

    def step(self, width: int | None = None, logits: bool = False):
        out = self.engine.generate(self.state, self.pages.table, width, logits=logits)
        self.state = out[0]
        return out[1:] if logits else out[1]

    def done(self, slot: int) -> bool:
        return bool(np.asarray(self.state.done)[slot])


def run_engine(driver: Driver, requests: dict[int, list[int]], n: int) -> dict[int, list[int]]:
    """Prefills and inserts each prompt into its slot, then decodes until every slot is done."""
    out = {slot: [driver.start(slot, prompt, n)] for slot, prompt in requests.items()}
    while not all(driver.done(s) for s in requests):
        tokens = driver.step()
        for slot in requests:
            out[slot] += [int(t) for t in tokens[slot] if t != NO_TOKEN]
    return out


@pytest.mark.numerics
def test_engine_slots_decode_like_generate(tiny_model):
    driver = Driver(Engine(tiny_model, CONFIG))
    out = run_engine(driver, {0: PROMPTS[0], 2: PROMPTS[1], 3: PROMPTS[2]}, 10)
    for slot, prompt in ((0, PROMPTS[0]), (2, PROMPTS[1]), (3, PROMPTS[2])):
        assert out[slot] == reference(tiny_model, prompt, 10)


@pytest.mark.numerics
def test_request_inserted_mid_decode_matches_running_alone(tiny_model):
    driver = Driver(Engine(tiny_model, CONFIG))
    first = run_engine(driver, {1: PROMPTS[3]}, 5)  # slot 1 finishes; its neighbour joins
    late = run_engine(driver, {0: PROMPTS[0]}, 9)
    assert first[1] == reference(tiny_model, PROMPTS[3], 5)
    assert late[0] == reference(tiny_model, PROMPTS[0], 9)


@pytest.mark.numerics
def test_one_step_calls_run_on_the_warmed_up_program_and_decode_like_generate(tiny_model):
    """Structured output decodes one step per call: the same program as decode_steps."""
    engine = Engine(tiny_model, CONFIG)
    engine.warmup()
    programs = engine_module.compiled_programs()
    driver = Driver(engine)
    out = [driver.start(0, PROMPTS[0], 7)]
    for _ in range(6):
        driver.state, tokens = engine.generate(driver.state, driver.pages.table, steps=1)
        assert tokens.shape == (engine.slots, 1)
        out += [int(t) for t in tokens[0] if t != NO_TOKEN]
    assert out == reference(tiny_model, PROMPTS[0], 7)
    assert engine_module.compiled_programs() == programs
    with pytest.raises(ValueError, match="1 to decode_steps=3 steps"):
        engine.generate(driver.state, driver.pages.table, steps=4)


@pytest.mark.numerics
def test_warmed_up_on_the_weights_shapes_it_serves_the_weights_without_compiling(tiny_model):
    shapes = weight_shapes(tiny_model.config)
    engine = Engine(tiny_model._replace(params=shapes), CONFIG)
    engine.warmup()
    programs = engine_module.compiled_programs()
    engine.use_params(tiny_model.params)
    out = run_engine(Driver(engine), {0: PROMPTS[0], 1: PROMPTS[2]}, 6)
    assert out[0] == reference(tiny_model, PROMPTS[0], 6)
    assert out[1] == reference(tiny_model, PROMPTS[2], 6)
    assert engine_module.compiled_programs() == programs
    with pytest.raises(ValueError, match="differ in structure, shape, dtype or placement"):
        engine.use_params(jax.tree.map(lambda x: x.astype("bfloat16"), tiny_model.params))


def test_free_returns_pages_and_page_0_is_never_handed_out():
    table = PageTable(num_pages=14, page_size=8, slots=4, pages_per_seq=8)
    assert table.free_count == 13
    pages = table.allocate(13)
    assert sorted(pages) == list(range(1, 14))
    assert table.allocate(1) is None
    table.release(pages[:4])
    table.assign(0, table.allocate(2))
    assert table.free_count == 2
    table.free(0)
    assert table.free_count == 4 and not table.table[0].any()


def test_page_table_grows_a_slot_page_by_page_and_moves_it():
    table = PageTable(num_pages=4, page_size=8, slots=2, pages_per_seq=4)
    table.assign(1, table.allocate(1))
    assert table.grow(1, 17) and table.table[1].tolist() == [1, 2, 3, 0]
    assert table.grow(1, 24)  # 3 pages hold 24 positions already
    assert not table.grow(1, 25)  # a fourth page: the pool has none left
    assert table.table[1].tolist() == [1, 2, 3, 0]
    table.move(1, 0)
    assert table.table[0].tolist() == [1, 2, 3, 0] and not table.table[1].any()
    with pytest.raises(ValueError, match="slot 0 holds 3 pages"):
        table.assign(0, [4])


@pytest.mark.numerics
def test_prefill_batch_rows_equal_each_prompt_alone(tiny_model):
    config = EngineConfig(**{**CONFIG.__dict__, "prefill_batch_size": 2})
    engine = Engine(tiny_model, config)
    pages = PageTable(engine.num_pages, engine.page_size, engine.slots, engine.pages_per_seq)
    rows = [PrefillRow(p, pages.allocate(pages.pages_for(len(p))), SamplingParams())
            for p in (PROMPTS[0], PROMPTS[3])]
    together = engine.prefill(rows).tokens
    alone = [engine.prefill([row]).tokens[0] for row in rows]
    assert together == alone == [reference(tiny_model, p, 1)[0] for p in (PROMPTS[0], PROMPTS[3])]


def test_seeded_sampling_gives_generates_tokens_in_any_slot(tiny_model):
    sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=11)
    draws = []
    for slot in (0, 3):
        driver = Driver(Engine(tiny_model, CONFIG))
        out = [driver.start(slot, PROMPTS[0], 7, sampling, stop_ids=[])]
        for _ in range(2):
            out += [int(t) for t in driver.step()[slot] if t != NO_TOKEN]
        draws.append(out)
    want = jaxinfer.generate(tiny_model.params, [PROMPTS[0]], tiny_model.config,
                             max_new_tokens=7, sampling=sampling).tokens[0]
    assert draws[0] == draws[1] == want


def test_prefill_buckets_double_up_to_the_context():
    assert prefill_buckets(16, 128) == [16, 32, 64, 128]
    assert prefill_buckets(16, 100) == [16, 32, 64, 100]


@pytest.mark.parametrize("field, value", [("max_batch_size", 0), ("page_size", -1),
                                          ("decode_steps", 0), ("num_pages", 1),
                                          ("max_queue_delay_ms", -5.0)])
def test_engine_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_page_pool_from_a_memory_budget_holds_no_more_than_every_slot_can_use(tiny_cfg):
    config = EngineConfig(max_batch_size=2, max_seq_len=64, page_size=8, kv_cache_gb=1.0)
    assert config.pool_pages(tiny_cfg) == 2 * 8 + 1  # two full rows and the scratch page
    assert EngineConfig(max_batch_size=2, num_pages=100).pool_pages(tiny_cfg) == 100


def test_page_pool_smaller_than_one_request_is_refused(tiny_cfg):
    with pytest.raises(ValueError, match="needs 8"):
        EngineConfig(max_seq_len=64, page_size=8, num_pages=5).pool_pages(tiny_cfg)


# -- the scheduler --------------------------------------------------------------------------


class Collector:
    """A request sink that remembers everything and signals the end."""

    def __init__(self):
        self.outputs: list[Output] = []
        self.finished = threading.Event()

    def __call__(self, output: Output) -> None:
        self.outputs.append(output)
        if output.finish_reason:
            self.finished.set()

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]


def submit_all(scheduler, prompts, max_tokens):
    sinks = []
    for prompt in prompts:
        sink = Collector()
        scheduler.submit(Request(list(prompt), max_tokens, sink=sink))
        sinks.append(sink)
    for sink in sinks:  # measured: each test here takes under 13 s with both cores busy
        assert sink.finished.wait(60)
    return sinks


@pytest.mark.numerics
def test_scheduler_preempts_when_pages_run_out_and_still_finishes(tiny_model):
    # 4 requests of 8 + 40 tokens need 4 x 6 pages; the pool has 13.
    scheduler = Scheduler(Engine(tiny_model, CONFIG))
    scheduler.start()
    try:
        prompts = [[11 + i, 40, 41, 42, 43, 44, 45, 46] for i in range(4)]
        sinks = submit_all(scheduler, prompts, 40)
        assert scheduler.preemptions > 0
        deadline = time.monotonic() + 10  # the last sink is called just before its release
        while scheduler.pages.free_count != 13 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.pages.free_count == 13  # every page came back
        for prompt, sink in zip(prompts, sinks, strict=True):
            want = reference(tiny_model, prompt, 40)
            assert sink.tokens == want  # resumed by recomputing: the same greedy tokens
            assert sink.outputs[-1].finish_reason == ("length" if len(want) == 40 else "stop")
    finally:
        scheduler.stop(10)


@pytest.mark.numerics
def test_queue_delay_batches_prefills_that_arrive_close_together(tiny_model):
    config = EngineConfig(**{**CONFIG.__dict__, "prefill_batch_size": 2,
                             "max_queue_delay_ms": 2000.0})
    engine = Engine(tiny_model, config)
    calls = []
    prefill = engine.prefill
    engine.prefill = lambda rows: calls.append(len(rows)) or prefill(rows)
    scheduler = Scheduler(engine)
    scheduler.start()
    try:
        first, second = Collector(), Collector()
        scheduler.submit(Request(PROMPTS[0], 4, sink=first))
        time.sleep(0.3)  # the first waits (up to 2 s) for a second prompt: a 1.7 s margin
        scheduler.submit(Request(PROMPTS[3], 4, sink=second))
        assert first.finished.wait(60) and second.finished.wait(60)
        assert calls == [2]  # one prefill of both
        assert first.tokens == reference(tiny_model, PROMPTS[0], 4)
        assert second.tokens == reference(tiny_model, PROMPTS[3], 4)
    finally:
        scheduler.stop(10)


def test_full_queue_raises_queue_full(tiny_model):
    config = EngineConfig(**{**CONFIG.__dict__, "max_queue_size": 2})
    scheduler = Scheduler(Engine(tiny_model, config))
    scheduler._thread = threading.Thread(target=lambda: None)  # alive, but never admits
    scheduler._thread.is_alive = lambda: True
    scheduler.submit(Request([1, 2], 4))
    scheduler.submit(Request([1, 2], 4))
    with pytest.raises(QueueFull, match="2 requests"):
        scheduler.submit(Request([1, 2], 4))


def test_engine_rejects_requests_past_its_context(tiny_model):
    scheduler = Scheduler(Engine(tiny_model, CONFIG))
    with pytest.raises(ValueError, match="64 tokens"):
        scheduler.check(prompt_tokens=60, max_tokens=10)


@pytest.mark.numerics
def test_stop_ids_end_the_slot_on_device(tiny_model):
    driver = Driver(Engine(tiny_model, CONFIG))
    free = reference(tiny_model, PROMPTS[1], 12)
    stop = next(t for i, t in enumerate(free) if i > 0 and t not in free[:i])
    out = [driver.start(0, PROMPTS[1], 12, stop_ids=[stop])]
    while not driver.done(0):
        out += [int(t) for t in driver.step()[0] if t != NO_TOKEN]
    assert out == free[: free.index(stop) + 1]
    assert np.all(np.asarray(driver.state.done)[1:])  # free slots stay done


# -- load-following decode: batch invariance --------------------------------------------------

# A vocabulary and context big enough that the minimum decode width is 2 (see serving.engine).
WIDE_CFG = dataclasses.replace(TINY, vocab_size=4096, max_seq_len=512)
WIDE_CONFIG = EngineConfig(max_batch_size=32, max_seq_len=512, page_size=16, num_pages=600,
                           decode_steps=4, max_queue_size=64)
TARGET = [5, 17, 99, 3, 250, 42, 7, 8, 1000, 2047]
TARGET_SAMPLING = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)


@pytest.fixture(scope="module")
def wide_model(smollm2_path):
    params = llama.init_params(WIDE_CFG, jax.random.key(1))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * 8, params)
    return jaxinfer.Model(WIDE_CFG, params, gguf_vocab.build(smollm2_path))


def test_decode_widths_start_where_row_numerics_stop_depending_on_the_width(tiny_model,
                                                                            wide_model):
    # 4 heads x one attention block of 256 positions per row: 4 rows reach 4,096.
    assert Engine(wide_model, WIDE_CONFIG).decode_widths == [4, 8, 16, 32]
    # 4 heads x 64 positions or 256 vocabulary entries per row: 16 rows reach 4,096.
    assert Engine(tiny_model, CONFIG).decode_widths == [4]  # fixed width: all 4 slots
    assert Engine(tiny_model, EngineConfig(**{**CONFIG.__dict__, "max_batch_size": 32})
                  ).decode_widths == [16, 32]


def decode_beside(model, running: int, rng) -> tuple[list[int], np.ndarray]:
    """TARGET's tokens and logits [tokens, vocab] when it decodes beside running - 1 random
    others (random prompts, lengths, sampling and slots), at the narrowest width holding them."""
    engine = Engine(model, WIDE_CONFIG)
    driver = Driver(engine)
    slot = int(rng.integers(running))
    for other in set(range(running)) - {slot}:
        prompt = rng.integers(0, WIDE_CFG.vocab_size, int(rng.integers(1, 60))).tolist()
        sampling = SamplingParams(temperature=float(rng.choice([0.0, 1.0])),
                                  seed=int(rng.integers(2**31)))
        driver.start(other, prompt, 40, sampling, stop_ids=[])
    out = [driver.start(slot, TARGET, 12, TARGET_SAMPLING, stop_ids=[])]
    logits = []
    while len(out) < 12:
        tokens, step_logits = driver.step(engine.decode_width(running), logits=True)
        live = tokens[slot] != NO_TOKEN
        out += tokens[slot][live].tolist()
        logits.append(step_logits[slot][live])
    return out, np.concatenate(logits)


def test_logits_are_bitwise_the_same_at_decode_widths_1_2_8_32(wide_model, rng):
    alone_tokens, alone_logits = decode_beside(wide_model, 1, rng)
    assert alone_tokens == reference(wide_model, TARGET, 12, TARGET_SAMPLING)
    for running in (2, 8, 32):
        tokens, logits = decode_beside(wide_model, running, rng)
        assert tokens == alone_tokens, running
        np.testing.assert_array_equal(logits, alone_logits)  # bitwise, every vocabulary entry


def test_scheduler_keeps_requests_packed_and_decodes_only_the_occupied_width(tiny_model):
    config = EngineConfig(**{**CONFIG.__dict__, "max_batch_size": 32, "num_pages": 200,
                             "max_queue_size": 32})
    engine = Engine(tiny_model, config)
    widths = []
    generate = engine.generate
    engine.generate = lambda state, table, width: widths.append(width) or generate(
        state, table, width)
    scheduler = Scheduler(engine)
    scheduler.start()
    try:
        short = submit_all(scheduler, [PROMPTS[2]], 3)  # alone: the narrowest width
        assert set(widths) == {16}
        sinks = [Collector() for _ in range(20)]
        for i, sink in enumerate(sinks):  # ends at different times: holes get filled
            scheduler.submit(Request(PROMPTS[i % 4], 4 + i, sink=sink))
        for sink in sinks:
            assert sink.finished.wait(60)
        assert 32 in widths and widths[-1] == 16
        assert short[0].tokens == reference(tiny_model, PROMPTS[2], 3)
        for i, sink in enumerate(sinks):
            assert sink.tokens == reference(tiny_model, PROMPTS[i % 4], 4 + i)
    finally:
        scheduler.stop(10)


# -- the same through the HTTP server, default engine flags -----------------------------------


class RecordingEngine(Engine):
    """An engine that keeps the logits of slot 0 at every decode call, and whose decode calls
    wait while `hold` is clear. The first request a quiet server admits takes slot 0 and
    keeps it while it runs (packing fills holes from the top), so those rows are that
    request's logits, in order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slot0: list[np.ndarray] = []
        self.widths: list[int] = []
        self.hold = threading.Event()

    def generate(self, state, page_table, width=None, *, logits=False):
        self.hold.wait()
        state, tokens, all_logits = super().generate(state, page_table, width, logits=True)
        self.widths.append(width)
        self.slot0.append(all_logits[0][tokens[0] != NO_TOKEN])
        return state, tokens


def test_through_the_server_logits_and_seeded_text_do_not_depend_on_what_runs_beside(
        wide_model, rng):
    import concurrent.futures

    import httpx
    import uvicorn

    from jaxinfer.serving.server import ServerState, create_app

    engine = RecordingEngine(wide_model, EngineConfig(max_batch_size=32, num_pages=600))
    engine.hold.set()
    state = ServerState("tiny")
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1/completions"
    state.attach(engine)
    target = {"model": "tiny", "prompt": TARGET, "max_tokens": 12, "temperature": 0.9,
              "top_p": 0.95, "seed": 1234, "stream": True}

    def other() -> None:
        prompt = rng.integers(0, WIDE_CFG.vocab_size, int(rng.integers(1, 60))).tolist()
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 40,
                "temperature": float(rng.choice([0.0, 1.0])), "seed": int(rng.integers(2**31))}
        assert httpx.post(url, json=body, timeout=300).status_code == 200

    def run(running: int) -> tuple[str, np.ndarray, int]:
        """The target's text, its logits [11, vocab] and the widest decode of its life, with
        running - 1 others admitted right after its first decode call."""
        engine.slot0.clear(), engine.widths.clear(), engine.hold.clear()
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            with httpx.stream("POST", url, json=target, timeout=300) as response:
                chunks = (line for line in response.iter_lines() if line.startswith("data: "))
                events = [next(chunks)]  # admitted: in slot 0 from now on
                others = [pool.submit(other) for _ in range(running - 1)]
                deadline = time.monotonic() + 60
                while state.scheduler.num_waiting < running - 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                engine.hold.set()
                events += list(chunks)
            for future in others:
                future.result()
        text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
        return text, np.concatenate(engine.slot0)[:11], max(engine.widths[:3])

    try:
        want = wide_model.tokenizer.decode(reference(wide_model, TARGET, 12, TARGET_SAMPLING))
        alone_text, alone_logits, _ = run(1)
        assert alone_text == want  # the HTTP API and generate(): the same text for the seed
        for running in (2, 8, 32):
            text, logits, width = run(running)
            assert text == want, running
            np.testing.assert_array_equal(logits, alone_logits)
            assert width == engine.decode_width(running)  # it did decode beside the others
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        state.scheduler.stop(timeout=30)
