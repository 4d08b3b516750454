"""Chunked prefill on the tiny random model: a prompt longer than `max_num_batched_tokens` is
prefilled a chunk per call, with the running requests decoding between chunks, and gives the
logits and greedy tokens of a whole-prompt prefill (jaxinfer.generate as the reference)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxinfer.sampling import SamplingParams
from jaxinfer.serving.engine import Engine, PrefillRow
from jaxinfer.serving.metrics import Metrics
from jaxinfer.serving.pages import PageTable
from jaxinfer.serving.scheduler import Request, Scheduler
from tests.numerics import assert_logits_close
from tests.test_prefix_caching import run, scaled_model, settle
from tests.test_serving_engine import CONFIG, ENGINE_ATOL, Collector, reference

CHUNKED = dataclasses.replace(CONFIG, max_num_batched_tokens=16)
LONG = [int(t) for t in np.random.default_rng(5).integers(1, 256, size=45)]


@pytest.fixture(scope="module")
def tiny_model(tiny_cfg, tiny_params, smollm2_path):
    return scaled_model(tiny_cfg, tiny_params, smollm2_path)


@pytest.fixture
def scheduler(tiny_model):
    """A scheduler prefilling at most 16 prompt tokens per call."""
    scheduler = Scheduler(Engine(tiny_model, CHUNKED), Metrics("tiny"))
    scheduler.start()
    yield scheduler
    scheduler.stop(10)


def test_prompts_longer_than_a_chunk_need_no_bucket_of_their_own(tiny_model):
    engine = Engine(tiny_model, CHUNKED)
    assert engine.chunk == 16 and engine.buckets == [16]
    with pytest.raises(ValueError, match="at most 16 .max_num_batched_tokens"):
        engine.prefill([PrefillRow(LONG, [1, 2, 3, 4, 5, 6], SamplingParams())])


@pytest.mark.numerics
def test_chunks_over_the_pages_written_give_the_logits_of_one_prefill(tiny_model):
    logits = []
    for config, chunk in ((CONFIG, len(LONG)), (CHUNKED, 16)):
        engine = Engine(tiny_model, config)
        table = PageTable(engine.num_pages, engine.page_size, engine.slots, engine.pages_per_seq)
        pages = table.allocate(table.pages_for(len(LONG) + 8))
        for start in range(0, len(LONG), chunk):
            row = PrefillRow(LONG[start : start + chunk], pages, SamplingParams(), max_tokens=8,
                             stop_ids=[], start=start)
            prefix = engine.prefill([row])
        table.assign(0, pages)
        state = engine.insert(prefix, engine.init_state(), 0)
        logits.append(engine.generate(state, table.table, 4, logits=True)[2][0])
    assert_logits_close(logits[1], logits[0], ENGINE_ATOL)  # measured: 2e-6


@pytest.mark.numerics
def test_running_requests_decode_between_the_chunks_of_a_long_prompt(tiny_model,
                                                                     scheduler):
    engine, calls = scheduler.engine, []
    prefill, generate = engine.prefill, engine.generate
    engine.prefill = lambda rows: calls.append(("prefill", rows[0].start)) or prefill(rows)
    engine.generate = lambda *a, **k: calls.append(("decode", None)) or generate(*a, **k)
    short = [7, 8, 9]
    sinks = [Collector(), Collector()]
    scheduler.submit(Request(short, 12, sink=sinks[0]))
    scheduler.submit(Request(LONG, 10, sink=sinks[1]))
    for sink in sinks:
        assert sink.finished.wait(60)
    chunks = [i for i, (what, start) in enumerate(calls) if what == "prefill" and start]
    assert [calls[i][1] for i in chunks] == [16, 32]  # the long prompt: 3 chunks, in order
    assert calls[chunks[0] - 1] == ("decode", None)  # the short request decoded between
    assert calls[chunks[1] - 1] == ("decode", None)
    assert sinks[0].tokens == reference(tiny_model, short, 12)
    assert sinks[1].tokens == reference(tiny_model, LONG, 10)
    settle(scheduler)


@pytest.mark.numerics
def test_a_long_prompt_reuses_its_cached_prefix_and_chunks_the_rest(tiny_model,
                                                                    scheduler):
    run(scheduler, [LONG[:40]], 2)
    again, = run(scheduler, [LONG + [3] * 10], 4)
    assert again.outputs[-1].cached_tokens == 40
    assert again.tokens == reference(tiny_model, LONG + [3] * 10, 4)
    settle(scheduler)


def test_aborting_a_prompt_between_its_chunks_returns_its_pages(tiny_model,
                                                               scheduler):
    engine, sink = scheduler.engine, Collector()
    request = Request(LONG, 10, sink=sink)
    prefill = engine.prefill
    engine.prefill = lambda rows: scheduler.abort(request.id) or prefill(rows)
    scheduler.submit(request)
    assert sink.finished.wait(60)
    assert sink.outputs[-1].finish_reason == "abort" and not sink.tokens
    settle(scheduler)
    assert scheduler.pages.cached_count == 2  # the first chunk's full pages stay cached
