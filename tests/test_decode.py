"""The decode core (jaxinfer/decode.py): one state, one step, one way of drawing; generate()
and the serving engine both drive it, and the eager mode runs the same code uncompiled."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer import decode
from jaxinfer.checkpoints import gguf_vocab
from jaxinfer.decode import NO_TOKEN, DecodeState
from jaxinfer.sampling import SamplingArrays, SamplingParams
from jaxinfer.serving import EngineConfig
from jaxinfer.serving.engine import Engine, PrefillRow
from jaxinfer.serving.pages import PageTable

CONFIG = EngineConfig(max_batch_size=4, max_seq_len=64, page_size=8, num_pages=40,
                      decode_steps=3)
PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 8], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [77, 78]]
SAMPLINGS = [SamplingParams(), SamplingParams(temperature=0.9, top_p=0.95, seed=1234),
             SamplingParams(temperature=1.0, top_k=20, seed=7)]


@pytest.fixture(scope="module")
def tiny_model(tiny_cfg, tiny_params, smollm2_path):
    params = jax.tree_util.tree_map_with_path(  # larger weights: continuations that vary
        lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * 8, tiny_params)
    return jaxinfer.Model(tiny_cfg, params, gguf_vocab.build(smollm2_path))


def engine_tokens(engine: Engine, prompts, samplings, n: int) -> list[list[int]]:
    """Every prompt in its own slot, decoded to n tokens (no stop ids)."""
    pages = PageTable(engine.num_pages, engine.page_size, engine.slots, engine.pages_per_seq)
    state = engine.init_state()
    out = []
    for slot, (prompt, sampling) in enumerate(zip(prompts, samplings, strict=True)):
        row = PrefillRow(prompt, pages.allocate(pages.pages_for(len(prompt) + n)), sampling,
                         max_tokens=n)
        prefix = engine.prefill([row])
        pages.assign(slot, row.pages)
        state = engine.insert(prefix, state, slot)
        out.append(list(prefix.tokens))
    while not np.all(np.asarray(state.done)[: len(prompts)]):
        state, tokens = engine.generate(state, pages.table, engine.decode_width(len(prompts)))
        for slot in range(len(prompts)):
            out[slot] += [int(t) for t in tokens[slot] if t != NO_TOKEN]
    return out


def test_generate_and_the_engine_give_the_same_tokens_for_greedy_and_seeded_requests(
        tiny_model):
    got = engine_tokens(Engine(tiny_model, CONFIG), PROMPTS, SAMPLINGS, 10)
    for prompt, sampling, tokens in zip(PROMPTS, SAMPLINGS, got, strict=True):
        want = jaxinfer.generate(tiny_model.params, [prompt], tiny_model.config,
                                 max_new_tokens=10, sampling=sampling).tokens[0]
        assert tokens == want


def test_generate_and_the_engine_call_the_same_decode_step(tiny_model, monkeypatch):
    calls = []
    step = decode.step
    monkeypatch.setattr(decode, "step", lambda *args: calls.append(1) or step(*args))
    jaxinfer.generate(tiny_model.params, [PROMPTS[0]], tiny_model.config, max_new_tokens=3,
                      eager=True)
    by_generate = len(calls)
    engine_tokens(Engine(tiny_model, EngineConfig(**{**CONFIG.__dict__, "eager": True})),
                  PROMPTS[:1], SAMPLINGS[:1], 4)
    assert by_generate == 2 and len(calls) - by_generate == CONFIG.decode_steps


def test_eager_mode_runs_the_same_code_to_the_same_tokens(tiny_model):
    args = (tiny_model.params, PROMPTS, tiny_model.config)
    options = dict(max_new_tokens=6, sampling=SAMPLINGS)
    compiled = jaxinfer.generate(*args, **options)
    eager = jaxinfer.generate(*args, **options, eager=True)
    assert eager.tokens == compiled.tokens and eager.timings["compile"] == 0.0


def test_record_appends_to_live_rows_only_and_ends_them_on_stops_and_budgets():
    state = DecodeState.start(first=jnp.array([4, 9, 4]), position=jnp.array([3, 5, 0]),
                              count=jnp.array([0, 0, 0]), max_tokens=jnp.array([3, 2, 5]),
                              stop_ids=jnp.array([[7, NO_TOKEN]] * 3),
                              sampling=SamplingArrays.stack([SamplingParams()] * 3),
                              live=jnp.array([True, True, False]))
    assert state.count.tolist() == [1, 1, 1] and state.done.tolist() == [False, False, True]
    state, emitted = state.record(jnp.array([7, 8, 1]))
    assert emitted.tolist() == [7, 8, NO_TOKEN]
    assert state.done.tolist() == [True, True, True]  # a stop id; a budget of 2; padding
    assert state.stopped.tolist() == [True, False, False]
    assert state.position.tolist() == [4, 6, 0] and state.last.tolist() == [7, 8, 4]
    state, emitted = state.record(jnp.array([1, 2, 3]))
    assert emitted.tolist() == [NO_TOKEN] * 3 and state.count.tolist() == [2, 2, 1]
