"""The host tier of the prefix cache on the tiny random model: cached pages evicted from the
device pool go to jax "pinned_host" memory, and a later prefix hit copies them back, giving
the same K/V bit for bit and the logits of a full prefill."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from jaxinfer.serving.engine import Engine
from jaxinfer.serving.pages import HostTier, PageTable
from jaxinfer.serving.scheduler import host_tier
from tests.numerics import assert_logits_close
from tests.test_prefix_caching import DOCUMENT, prefill_into, scaled_model
from tests.test_serving_engine import CONFIG, ENGINE_ATOL


@pytest.fixture(scope="module")
def tiny_model(tiny_cfg, tiny_params, smollm2_path):
    return scaled_model(tiny_cfg, tiny_params, smollm2_path)


@pytest.mark.numerics
def test_evicted_pages_come_back_from_host_memory_with_the_same_kv_and_logits(tiny_model):
    engine = Engine(tiny_model, CONFIG)
    host = HostTier(2**20, engine.read_pages, engine.write_pages)
    table = PageTable(engine.num_pages, engine.page_size, engine.slots, engine.pages_per_seq,
                      prefix_caching=True, host=host)
    state = engine.init_state()
    _, state = prefill_into(engine, table, 0, DOCUMENT, state)
    table.cache(table.slot_pages[0], DOCUMENT)
    first_pages = table.slot_pages[0][:3]  # DOCUMENT's 30 tokens fill 3 pages
    before = [[np.asarray(x) for x in engine.read_pages(p)] for p in first_pages]
    state = engine.free(state, 0)
    table.free(0)
    table.release(table.allocate(table.usable))  # every page reused: the cached 3 evicted
    assert table.cached_count == 0 and len(host) == 3
    kept = host._pages[next(iter(host._pages))]
    assert all(x.sharding.memory_kind == "pinned_host" for x in kept)

    question = DOCUMENT + [5, 6]
    cached = table.lookup(question)
    assert len(cached) == 3 and host.restored == 3 and len(host) == 0
    after = [[np.asarray(x) for x in engine.read_pages(p)] for p in cached]
    for was, now in zip(before, after, strict=True):
        for x, y in zip(was, now, strict=True):
            np.testing.assert_array_equal(x, y)  # a copy, not a recomputation
    _, state = prefill_into(engine, table, 0, question, state, cached)
    _, state = prefill_into(engine, table, 1, question, state)  # the reference: no cache
    _, _, logits = engine.generate(state, table.table, 4, logits=True)
    assert_logits_close(logits[0], logits[1], ENGINE_ATOL)


def test_the_host_tier_is_a_no_op_on_a_cpu_only_machine_with_a_log_line(tiny_model, caplog):
    config = dataclasses.replace(CONFIG, host_kv_cache_gb=0.25)
    engine = Engine(tiny_model, config)
    with caplog.at_level(logging.INFO, logger="jaxinfer.serving.scheduler"):
        assert host_tier(engine) is None
    assert "no-op" in caplog.text
    forced = host_tier(engine, force=True)
    assert forced is not None and forced.budget_bytes == 2**28
    assert host_tier(Engine(tiny_model, CONFIG)) is None  # none asked for


def test_a_negative_host_budget_is_refused():
    with pytest.raises(ValueError, match="host_kv_cache_gb"):
        dataclasses.replace(CONFIG, host_kv_cache_gb=-1.0)
