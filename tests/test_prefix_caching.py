"""Prefix caching in the serving engine and scheduler on the tiny random model: a prefill over
cached pages gives the logits of a full prefill, and requests sharing prefixes get
generate()'s greedy tokens through reuse, preemption, abort and eviction, with every page's
reference count back at 0 at the end."""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
import pytest

import jaxinfer
from jaxinfer.checkpoints import gguf_vocab
from jaxinfer.sampling import SamplingParams
from jaxinfer.serving.engine import Engine, PrefillRow
from jaxinfer.serving.metrics import Metrics
from jaxinfer.serving.pages import PageTable
from jaxinfer.serving.scheduler import Request, Scheduler
from tests.numerics import assert_logits_close, assert_top1_agrees_where_decisive
from tests.test_serving_engine import CONFIG, ENGINE_ATOL, Collector, reference


def scaled_model(cfg, params, smollm2_path) -> jaxinfer.Model:
    """As in test_serving_engine: weights 8x their init scale make greedy continuations vary."""
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * 8, params
    )
    return jaxinfer.Model(cfg, params, gguf_vocab.build(smollm2_path))


@pytest.fixture(scope="module")
def tiny_model(tiny_cfg, tiny_params, smollm2_path):
    return scaled_model(tiny_cfg, tiny_params, smollm2_path)


DOCUMENT = [int(t) for t in np.random.default_rng(3).integers(1, 256, size=30)]


def prefill_into(engine, table, slot, sequence, state, cached=()):
    """Prefills `sequence` into `slot` over the `cached` pages (its first positions)."""
    cached = list(cached)
    new = table.allocate(table.pages_for(len(sequence) + 8) - len(cached))
    start = len(cached) * engine.page_size
    row = PrefillRow(sequence[start:], cached + new, SamplingParams(), max_tokens=8,
                     stop_ids=[], start=start)
    prefix = engine.prefill([row])
    table.assign(slot, cached + new)
    return prefix.tokens[0], engine.insert(prefix, state, slot)


@pytest.mark.numerics
@pytest.mark.parametrize("shared", [8, 13, 16, 21])  # page size 8: aligned and not
def test_prefill_over_cached_pages_gives_the_logits_of_a_full_prefill(tiny_model, shared):
    engine = Engine(tiny_model, CONFIG)
    table = PageTable(engine.num_pages, engine.page_size, engine.slots, engine.pages_per_seq,
                      prefix_caching=True)
    state = engine.init_state()
    _, state = prefill_into(engine, table, 2, DOCUMENT, state)
    table.cache(table.slot_pages[2], DOCUMENT)
    question = DOCUMENT[:shared] + [7, 70, 170, 3, 33]
    cached = table.lookup(question)
    assert len(cached) * engine.page_size == shared // 8 * 8
    first_cached, state = prefill_into(engine, table, 0, question, state, cached)
    first_full, state = prefill_into(engine, table, 1, question, state)
    assert first_cached == first_full
    state, _, logits = engine.generate(state, table.table, 4, logits=True)  # slots 0-3
    worst = assert_logits_close(logits[0], logits[1], ENGINE_ATOL)  # measured: 0 to 2e-6
    assert_top1_agrees_where_decisive(logits[0], logits[1], max(worst, 1e-6))


@pytest.mark.numerics
def test_sliding_window_layers_over_cached_pages_give_the_logits_of_a_full_prefill(tiny_model):
    # Gemma 3's pattern on the tiny model: one sliding layer (window 8) and one global one.
    # Cached pages keep every position, and attention masks by window, so reuse is exact.
    cfg = dataclasses.replace(tiny_model.config, sliding_window=8,
                              layer_types=("sliding_attention", "full_attention"))
    engine = Engine(tiny_model._replace(config=cfg), CONFIG)
    table = PageTable(engine.num_pages, engine.page_size, engine.slots, engine.pages_per_seq,
                      prefix_caching=True)
    state = engine.init_state()
    _, state = prefill_into(engine, table, 2, DOCUMENT, state)
    table.cache(table.slot_pages[2], DOCUMENT)
    question = DOCUMENT[:21] + [7, 70, 170]
    _, state = prefill_into(engine, table, 0, question, state, table.lookup(question))
    _, state = prefill_into(engine, table, 1, question, state)
    _, _, logits = engine.generate(state, table.table, 4, logits=True)
    assert_logits_close(logits[0], logits[1], ENGINE_ATOL)


def run(scheduler, prompts, max_tokens, abort_after=None):
    """Submits the prompts at once; returns their sinks when all finished."""
    sinks = []
    for prompt in prompts:
        sinks.append(sink := Collector())
        request = Request(list(prompt), max_tokens, sink=sink)
        scheduler.submit(request)
        if abort_after is not None:
            while len(sink.tokens) < abort_after and not sink.finished.is_set():
                time.sleep(0.005)
            scheduler.abort(request.id)
    for sink in sinks:
        assert sink.finished.wait(60)
    return sinks


def settle(scheduler):
    """Waits until every page is free again (the last sink is called just before release)."""
    deadline = time.monotonic() + 10
    while scheduler.pages.free_count != scheduler.pages.usable and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.pages.free_count == scheduler.pages.usable
    assert not scheduler.pages.refs.any()


@pytest.fixture
def scheduler(tiny_model, request):
    config = dataclasses.replace(CONFIG, **getattr(request, "param", {}))
    scheduler = Scheduler(Engine(tiny_model, config), Metrics("tiny"))
    scheduler.start()
    yield scheduler
    scheduler.stop(10)


@pytest.mark.numerics
def test_a_second_request_reuses_the_shared_prefix_and_says_how_many_tokens(tiny_model,
                                                                             scheduler):
    question = DOCUMENT[:21] + [9, 99, 199]
    first, = run(scheduler, [DOCUMENT], 6)
    second, = run(scheduler, [question], 6)
    assert first.outputs[-1].cached_tokens == 0
    assert second.outputs[-1].cached_tokens == 16  # two full pages of the 21 shared tokens
    assert first.tokens == reference(tiny_model, DOCUMENT, 6)
    assert second.tokens == reference(tiny_model, question, 6)
    metrics = scheduler.metrics
    assert metrics.prefix_cache_queries._value.get() == len(DOCUMENT) + len(question)
    assert metrics.prefix_cache_hits._value.get() == 16
    settle(scheduler)


@pytest.mark.numerics
@pytest.mark.parametrize("scheduler", [{"enable_prefix_caching": False}], indirect=True)
def test_without_prefix_caching_nothing_is_reused(tiny_model, scheduler):
    run(scheduler, [DOCUMENT], 2)
    again, = run(scheduler, [DOCUMENT], 6)
    assert again.outputs[-1].cached_tokens == 0 and scheduler.pages.cached_count == 0
    assert again.tokens == reference(tiny_model, DOCUMENT, 6)


@pytest.mark.numerics
def test_requests_sharing_a_prefix_through_preemption_get_generates_tokens(tiny_model,
                                                                           scheduler):
    # 4 requests of 20 + 30 tokens need 7 pages each (2 of them shared); the pool has 13.
    prompts = [DOCUMENT[:16] + [11 + i, 40, 41, 42] for i in range(4)]
    sinks = run(scheduler, prompts, 30)
    assert scheduler.preemptions > 0
    assert scheduler.metrics.prefix_cache_hits._value.get() >= 3 * 16
    for prompt, sink in zip(prompts, sinks, strict=True):
        assert sink.tokens == reference(tiny_model, prompt, 30)
    settle(scheduler)


@pytest.mark.numerics
def test_an_aborted_request_leaves_its_prefix_cached_and_counts_right(tiny_model, scheduler):
    aborted, = run(scheduler, [DOCUMENT], 30, abort_after=3)
    assert aborted.outputs[-1].finish_reason == "abort"
    settle(scheduler)
    again, = run(scheduler, [DOCUMENT + [5]], 6)
    assert again.outputs[-1].cached_tokens == 24
    assert again.tokens == reference(tiny_model, DOCUMENT + [5], 6)
    settle(scheduler)


@pytest.mark.numerics
def test_evicted_prefixes_are_recomputed_and_give_the_same_tokens(tiny_model, scheduler):
    run(scheduler, [DOCUMENT], 2)
    others = [[int(t) for t in np.random.default_rng(10 + i).integers(1, 256, size=40)]
              for i in range(4)]
    run(scheduler, others, 2)  # 4 x 6 pages through a pool of 13: DOCUMENT's are evicted
    again, = run(scheduler, [DOCUMENT], 6)
    assert again.outputs[-1].cached_tokens < 24
    assert again.tokens == reference(tiny_model, DOCUMENT, 6)
    settle(scheduler)
