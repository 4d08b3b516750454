"""Sampling controls as per-row device arrays (issue 14): presence / frequency / repetition
penalties, logit_bias, min_tokens, ignore_eos, in generate() and the serving engine, checked
against a numpy reference of the adjusted logits; free rows beside them stay bitwise equal."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer.sampling import SamplingArrays, SamplingParams, TokenCounts, adjust_logits
from jaxinfer.serving import EngineConfig
from jaxinfer.serving.engine import NO_TOKEN, Engine
from tests.test_serving_engine import (
    TARGET,
    TARGET_SAMPLING,
    WIDE_CFG,
    WIDE_CONFIG,
    Driver,
    tiny_model,  # noqa: F401 - a fixture
    wide_model,  # noqa: F401 - a fixture
)

VOCAB = 50
SMALL = EngineConfig(max_batch_size=4, max_seq_len=64, page_size=8, num_pages=20,
                     decode_steps=3)


def numpy_adjusted(logits, sampling: SamplingParams, prompt, output, stops, count):
    """The adjusted logits [vocab] as vLLM / OpenAI define them, in float64."""
    logits = np.array(logits, np.float64)
    counts = np.bincount(np.asarray(output, int), minlength=len(logits))
    seen = (counts > 0) | (np.bincount(np.asarray(prompt, int), minlength=len(logits)) > 0)
    r = sampling.repetition_penalty
    logits = np.where(seen, np.where(logits > 0, logits / r, logits * r), logits)
    logits -= sampling.frequency_penalty * counts + sampling.presence_penalty * (counts > 0)
    for token, bias in sampling.logit_bias:
        logits[token] += bias
    if count < sampling.min_tokens:
        logits[list(stops)] = -np.inf
    return logits


ROWS = [
    SamplingParams(),
    SamplingParams(presence_penalty=1.5),
    SamplingParams(frequency_penalty=-0.7),
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(presence_penalty=-2, frequency_penalty=2, repetition_penalty=0.5,
                   logit_bias=((3, 100.0), (7, -100.0), (49, 2.5))),
    SamplingParams(min_tokens=4, logit_bias=((0, 1.0),)),
]


def test_adjusted_logits_equal_a_numpy_reference(rng):
    rows = len(ROWS)
    logits = rng.normal(0, 3, (rows, VOCAB)).astype(np.float32)
    seq = 12
    tokens = rng.integers(0, VOCAB, (rows, seq)).astype(np.int32)
    lengths = rng.integers(2, seq + 1, rows).astype(np.int32)
    count = np.array([0, 3, 1, 5, 2, 2], np.int32)  # the last `count` of each are output
    stops = np.array([[1, 2, NO_TOKEN]] * rows, np.int32)
    counts = TokenCounts.of(jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(count), VOCAB)
    got = adjust_logits(jnp.asarray(logits), SamplingArrays.stack(ROWS), counts,
                        jnp.asarray(stops), jnp.asarray(count))
    for i, sampling in enumerate(ROWS):
        prompt, output = tokens[i, : lengths[i] - count[i]], tokens[i, lengths[i] - count[i]:
                                                                     lengths[i]]
        want = numpy_adjusted(logits[i], sampling, prompt, output, [1, 2], count[i])
        np.testing.assert_allclose(np.asarray(got[i]), want, rtol=1e-6, atol=1e-5)


def test_a_row_with_every_control_off_keeps_its_logits_bitwise(rng):
    logits = jnp.asarray(rng.normal(0, 3, (2, VOCAB)).astype(np.float32))
    counts = TokenCounts.of(jnp.asarray(rng.integers(0, VOCAB, (2, 8)), jnp.int32),
                            jnp.array([8, 8]), jnp.array([3, 3]), VOCAB)
    sampling = SamplingArrays.stack([SamplingParams(), SamplingParams(presence_penalty=1.0)])
    got = adjust_logits(logits, sampling, counts, jnp.full((2, 2), NO_TOKEN), jnp.array([0, 0]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(logits[0]))


def test_sampling_params_refuse_out_of_range_controls():
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=-3),
                dict(repetition_penalty=0), dict(min_tokens=-1), dict(logprobs=21),
                dict(logit_bias=((1, 101.0),))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


PENALIZED = [SamplingParams(presence_penalty=1.2, frequency_penalty=0.6),
             SamplingParams(repetition_penalty=1.5),
             SamplingParams(logit_bias=((17, 4.0), (42, -3.0)), frequency_penalty=-0.5)]


@pytest.mark.numerics
@pytest.mark.parametrize("sampling", PENALIZED, ids=["presence+frequency", "repetition",
                                                     "bias"])
def test_engine_greedy_tokens_are_the_argmax_of_the_reference_adjusted_logits(
        tiny_model, sampling):  # noqa: F811
    """The engine's raw logits at each step, adjusted by the numpy reference over the
    sequence so far, pick each greedy token (wherever the reference is decisive)."""
    engine = Engine(tiny_model, SMALL)
    driver = Driver(engine)
    prompt = [5, 17, 99, 3, 250, 42, 7, 8, 17, 17]
    first = driver.start(0, prompt, 24, sampling, stop_ids=[])
    out, logits = [first], []
    while not driver.done(0):
        tokens, step_logits = driver.step(logits=True)
        live = tokens[0] != NO_TOKEN
        out += tokens[0][live].tolist()
        logits += list(step_logits[0][live])
    assert len(out) == 24
    checked = 0
    for i, step_logits in enumerate(logits):  # step i drew out[i + 1] after out[: i + 1]
        want = numpy_adjusted(step_logits, sampling, prompt, out[: i + 1], [], i + 1)
        top2 = np.sort(want)[-2:]
        if top2[1] - top2[0] > 1e-4:
            assert out[i + 1] == int(np.argmax(want)), i
            checked += 1
    assert checked >= 20
    plain = jaxinfer.generate(tiny_model.params, [prompt], tiny_model.config,
                              max_new_tokens=24).tokens[0]
    assert out != plain  # the controls changed the continuation


def test_generate_takes_the_same_controls(tiny_model):  # noqa: F811
    params, cfg = tiny_model.params, tiny_model.config
    prompt = [5, 17, 99, 3]
    for sampling in PENALIZED:
        engine = Engine(tiny_model, SMALL)
        driver = Driver(engine)
        out = [driver.start(0, prompt, 12, sampling, stop_ids=[])]
        while not driver.done(0):
            out += [t for t in driver.step()[0].tolist() if t != NO_TOKEN]
        got = jaxinfer.generate(params, [prompt], cfg, max_new_tokens=12, sampling=sampling)
        assert got.tokens[0] == out


def test_logit_bias_min_tokens_and_ignore_eos_in_generate(tiny_model):  # noqa: F811
    params, cfg = tiny_model.params, tiny_model.config
    eos = 2
    forced = SamplingParams(logit_bias=((eos, 100.0),))
    run = lambda sampling: jaxinfer.generate(  # noqa: E731
        params, [[5, 17, 99, 3]], cfg, max_new_tokens=10, sampling=sampling,
        stop_token_ids=[eos])
    assert run(forced).tokens[0] == [eos]  # +100 makes it the certain choice
    held = run(SamplingParams(logit_bias=((eos, 100.0),), min_tokens=4)).tokens[0]
    assert len(held) == 5 and held[-1] == eos and eos not in held[:4]
    ignored = run(SamplingParams(logit_bias=((eos, 100.0),), ignore_eos=True))
    assert ignored.tokens[0] == [eos] * 10 and ignored.finish_reasons == ["length"]


def test_free_rows_stay_bitwise_beside_rows_using_every_control(wide_model, rng):  # noqa: F811
    """TARGET (no controls) decodes beside rows with penalties, biases, min_tokens and
    logprobs: its tokens and every logit equal those it gets beside plain rows."""

    def target_beside(controls: bool):
        engine = Engine(wide_model, WIDE_CONFIG)
        driver = Driver(engine)
        for other in (1, 2, 3):
            prompt = rng.integers(0, WIDE_CFG.vocab_size, 20).tolist()
            sampling = SamplingParams(temperature=1.0, seed=other)
            if controls:
                sampling = SamplingParams(
                    temperature=1.0, seed=other, presence_penalty=1.0, frequency_penalty=0.5,
                    repetition_penalty=1.2, logit_bias=((int(other), 5.0),), min_tokens=3,
                    logprobs=5)
            driver.start(other, prompt, 30, sampling, stop_ids=[])
        out, logits = [driver.start(0, TARGET, 12, TARGET_SAMPLING, stop_ids=[])], []
        while len(out) < 12:
            tokens, step_logits = driver.step(4, logits=True)
            live = tokens[0] != NO_TOKEN
            out += tokens[0][live].tolist()
            logits.append(step_logits[0][live])
        return out, np.concatenate(logits)

    plain_tokens, plain_logits = target_beside(False)
    tokens, logits = target_beside(True)
    assert tokens == plain_tokens
    np.testing.assert_array_equal(logits, plain_logits)


def test_free_rows_stay_bitwise_beside_grammar_constrained_rows_at_one_step_a_call(
        wide_model, rng):  # noqa: F811
    """While a structured-output request runs the engine decodes one step per call with a
    bitmask: TARGET (unconstrained, all bits set) gets the tokens and logits it gets in
    decode_steps-step calls beside unconstrained rows."""
    words = -(-WIDE_CFG.vocab_size // 32)

    def target_beside(constrained: bool):
        engine = Engine(wide_model, WIDE_CONFIG)
        driver = Driver(engine)
        for other in (1, 2, 3):
            driver.start(other, rng.integers(0, WIDE_CFG.vocab_size, 20).tolist(), 30,
                         SamplingParams(temperature=1.0, seed=other), stop_ids=[])
        out, logits = [driver.start(0, TARGET, 12, TARGET_SAMPLING, stop_ids=[])], []
        while len(out) < 12:
            if constrained:
                bitmask = engine.any_token(4)
                bitmask[1:] = rng.integers(-2**31, 2**31, (3, words), dtype=np.int64).astype(
                    np.int32)  # random allowed sets for the constrained rows
                driver.state, tokens, step_logits = engine.generate(
                    driver.state, driver.pages.table, 4, logits=True, bitmask=bitmask, steps=1)
            else:
                tokens, step_logits = driver.step(4, logits=True)
            live = tokens[0] != NO_TOKEN
            out += tokens[0][live].tolist()
            logits.append(step_logits[0][live])
        return out, np.concatenate(logits)[:11]

    plain_tokens, plain_logits = target_beside(False)
    tokens, logits = target_beside(True)
    assert tokens == plain_tokens
    np.testing.assert_array_equal(logits, plain_logits)


def test_the_bitmask_confines_sampling_to_the_allowed_tokens(rng):
    logits = jnp.asarray(rng.normal(0, 3, (3, 70)).astype(np.float32))
    allowed = [[5], [0, 33, 69], list(range(70))]
    bitmask = np.zeros((3, 3), np.int32)
    for row, tokens in enumerate(allowed):
        for t in tokens:
            bitmask[row, t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))
    sampling = SamplingArrays.stack([SamplingParams(temperature=1.0, seed=s) for s in range(3)])
    got = adjust_logits(logits, sampling, None, jnp.full((3, 1), NO_TOKEN), jnp.array(0),
                        jnp.asarray(bitmask))
    for row, tokens in enumerate(allowed):
        finite = np.flatnonzero(np.isfinite(np.asarray(got[row])))
        assert finite.tolist() == tokens
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(logits[2]))
