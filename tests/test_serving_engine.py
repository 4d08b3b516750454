"""The serving engine and scheduler on the tiny random model: the engine API against
jaxinfer.generate, the page allocator, prefill batching with a queue delay, preemption.

The tokenizer is SmolLM2's (ids 0..255 of its vocabulary are the tiny model's whole
vocabulary), so detokenizing and stop ids run for real.
"""

from __future__ import annotations

import threading
import time

import jax
import numpy as np
import pytest

import jaxinfer
from jaxinfer.cache import KVCache
from jaxinfer.models import family
from jaxinfer.sampling import SamplingParams
from jaxinfer.serving import EngineConfig
from jaxinfer.serving.engine import NO_TOKEN, Engine, PrefillRow, prefill_buckets
from jaxinfer.serving.scheduler import Output, QueueFull, Request, Scheduler
from jaxinfer.tokenizer import Tokenizer
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
    return jaxinfer.Model(tiny_cfg, params, Tokenizer.from_gguf(smollm2_path))


# The engine (paged cache, 4 slots) runs other kernels than generate() (dense cache, 1 row):
# logits differ by up to 4e-6 here (range ~10). Its greedy tokens equal generate()'s because
# every reference path is checked to have no near-tie at this tolerance (smallest top-2
# margin measured: 9.7e-4, over the prompts below and the preemption test's).
ENGINE_ATOL = 1e-4


def reference(model, prompt, n):
    result = jaxinfer.generate(model.params, [prompt], model.config, max_new_tokens=n,
                               stop_token_ids=model.tokenizer.stop_ids)
    tokens = result.tokens[0]
    sequence = prompt + tokens[:-1]
    logits, _ = family(model.config.architecture).forward(
        model.params, np.array([sequence]), np.arange(len(sequence))[None],
        KVCache.init(model.config, 1, len(sequence)), model.config)
    assert_no_near_ties(np.asarray(logits[0, len(prompt) - 1:]), ENGINE_ATOL)
    return tokens


def run_engine(engine: Engine, requests: dict[int, list[int]], n: int) -> dict[int, list[int]]:
    """Prefills and inserts each prompt into its slot, then decodes until every slot is done."""
    out = {}
    for slot, prompt in requests.items():
        pages = engine.allocate(engine.pages_for(len(prompt) + n))
        (first,) = engine.prefill([PrefillRow(prompt, pages, SamplingParams())])
        engine.insert(slot, last_token=first, position=len(prompt), count=1, max_tokens=n,
                      pages=pages, sampling=SamplingParams(),
                      stop_ids=engine.tokenizer.stop_ids)
        out[slot] = [first]
        engine.done[slot] |= first in engine.tokenizer.stop_ids
    while not all(engine.done[s] for s in requests):
        tokens = engine.generate()
        for slot in requests:
            out[slot] += [int(t) for t in tokens[slot] if t != NO_TOKEN]
    return out


@pytest.mark.numerics
def test_engine_slots_decode_like_generate(tiny_model):
    engine = Engine(tiny_model, CONFIG)
    out = run_engine(engine, {0: PROMPTS[0], 2: PROMPTS[1], 3: PROMPTS[2]}, 10)
    for slot, prompt in ((0, PROMPTS[0]), (2, PROMPTS[1]), (3, PROMPTS[2])):
        assert out[slot] == reference(tiny_model, prompt, 10)


@pytest.mark.numerics
def test_request_inserted_mid_decode_matches_running_alone(tiny_model):
    engine = Engine(tiny_model, CONFIG)
    first = run_engine(engine, {1: PROMPTS[3]}, 5)  # slot 1 finishes; its neighbour joins
    late = run_engine(engine, {0: PROMPTS[0]}, 9)
    assert first[1] == reference(tiny_model, PROMPTS[3], 5)
    assert late[0] == reference(tiny_model, PROMPTS[0], 9)


def test_free_returns_pages_and_page_0_is_never_handed_out(tiny_model):
    engine = Engine(tiny_model, CONFIG)
    total = engine.free_page_count
    assert total == CONFIG.num_pages - 1
    pages = engine.allocate(total)
    assert sorted(pages) == list(range(1, CONFIG.num_pages))
    assert engine.allocate(1) is None
    engine.release(pages[:4])
    engine.insert(0, last_token=1, position=3, count=1, max_tokens=4, pages=pages[:0] or
                  engine.allocate(2), sampling=SamplingParams(), stop_ids=[])
    assert engine.free_page_count == 2
    engine.free(0)
    assert engine.free_page_count == 4 and not engine.page_table[0].any()


@pytest.mark.numerics
def test_prefill_batch_rows_equal_each_prompt_alone(tiny_model):
    config = EngineConfig(**{**CONFIG.__dict__, "prefill_batch_size": 2})
    engine = Engine(tiny_model, config)
    rows = [PrefillRow(p, engine.allocate(engine.pages_for(len(p))), SamplingParams())
            for p in (PROMPTS[0], PROMPTS[3])]
    together = engine.prefill(rows)
    alone = [engine.prefill([row])[0] for row in rows]
    assert together == alone == [reference(tiny_model, p, 1)[0] for p in (PROMPTS[0], PROMPTS[3])]


def test_seeded_sampling_does_not_depend_on_the_slot(tiny_model):
    sampling = SamplingParams(temperature=1.0, seed=11)
    draws = []
    for slot in (0, 3):
        engine = Engine(tiny_model, CONFIG)
        pages = engine.allocate(4)
        (first,) = engine.prefill([PrefillRow(PROMPTS[0], pages, sampling)])
        engine.insert(slot, last_token=first, position=len(PROMPTS[0]), count=1,
                      max_tokens=7, pages=pages, sampling=sampling, stop_ids=[])
        draws.append([first, *engine.generate()[slot].tolist(), *engine.generate()[slot]])
    assert draws[0] == draws[1]


def test_prefill_buckets_double_up_to_the_context():
    assert prefill_buckets(16, 128) == [16, 32, 64, 128]
    assert prefill_buckets(16, 100) == [16, 32, 64, 100]


@pytest.mark.parametrize("field, value", [("max_batch_size", 0), ("page_size", -1),
                                          ("decode_steps", 0), ("num_pages", 1),
                                          ("max_queue_delay_ms", -5.0)])
def test_engine_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


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
        assert scheduler.engine.free_page_count == 13  # every page came back
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
    engine = Engine(tiny_model, CONFIG)
    free = reference(tiny_model, PROMPTS[1], 12)
    stop = next(t for i, t in enumerate(free) if i > 0 and t not in free[:i])
    pages = engine.allocate(5)
    (first,) = engine.prefill([PrefillRow(PROMPTS[1], pages, SamplingParams())])
    engine.insert(0, last_token=first, position=len(PROMPTS[1]), count=1, max_tokens=12,
                  pages=pages, sampling=SamplingParams(), stop_ids=[stop])
    out = [first]
    while not engine.done[0]:
        out += [int(t) for t in engine.generate()[0] if t != NO_TOKEN]
    assert out == free[: free.index(stop) + 1]
    assert np.all(engine.done[1:])  # free slots stay done


@pytest.mark.numerics
def test_adaptive_decode_runs_the_occupied_prefix_of_slots(tiny_model):
    config = EngineConfig(**{**CONFIG.__dict__, "adaptive_decode": True})
    engine = Engine(tiny_model, config)
    assert engine.decode_widths == [1, 2, 4] and engine.decode_width() == 1
    out = run_engine(engine, {0: PROMPTS[0]}, 7)
    assert out[0] == reference(tiny_model, PROMPTS[0], 7)
    engine.free(0)
    pages = engine.allocate(2)
    engine.insert(2, last_token=1, position=3, count=1, max_tokens=4, pages=pages,
                  sampling=SamplingParams(), stop_ids=[])
    assert engine.decode_width() == 4  # slot 2 needs the width-4 program
