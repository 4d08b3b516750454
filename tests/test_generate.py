"""The cache, the compiled decode loop and generate(): equivalences, buckets and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer.api import weight_shapes
from jaxinfer.cache import KVCache
from jaxinfer.generate import bucket, compiled_programs, precompile
from jaxinfer.models import llama
from tests.numerics import assert_greedy_agrees_until_a_near_tie

# Max |logits diff| between two fp32 runs of the tiny model that differ in summation order
# (a cache or not, another batch size), as test_prefill_then_decode_... measures it.
TINY_ATOL = 1e-5


def _teacher_forced_logits(params, cfg, prompt, tokens):
    """[len(tokens), vocab]: the logits that chose each of `tokens` after `prompt`."""
    sequence = prompt + tokens[:-1]
    logits, _ = llama.forward(params, jnp.array([sequence]), jnp.arange(len(sequence))[None],
                              KVCache.init(cfg, 1, len(sequence)), cfg)
    return np.asarray(logits[0, len(prompt) - 1:])


@pytest.mark.parametrize("method", ["none", "ngram"])
def test_generate_returns_the_logits_each_token_was_drawn_from(tiny_cfg, tiny_params, method):
    """return_logits: one [length, vocab] array per row, within TINY_ATOL of the teacher-forced
    forward's logits for the tokens generated (speculation included), greedy's argmax."""
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6] * 2, [7, 7, 8]]
    result = jaxinfer.generate(tiny_params, prompts, tiny_cfg, max_new_tokens=9,
                               return_logits=True, speculative_method=method)
    assert jaxinfer.generate(tiny_params, prompts, tiny_cfg, max_new_tokens=2).logits is None
    for prompt, tokens, logits in zip(prompts, result.tokens, result.logits, strict=True):
        assert logits.shape == (len(tokens), tiny_cfg.vocab_size) and logits.dtype == np.float32
        want = _teacher_forced_logits(tiny_params, tiny_cfg, prompt, tokens)
        np.testing.assert_allclose(logits, want, atol=TINY_ATOL, rtol=0)


@pytest.mark.numerics
def test_prefill_then_decode_logits_equal_one_full_forward(tiny_cfg, tiny_params):
    tokens = jnp.array([[5, 17, 99, 3, 250, 42, 7, 8]])
    positions = jnp.arange(8)[None]
    full, _ = llama.forward(tiny_params, tokens, positions, KVCache.init(tiny_cfg, 1, 16), tiny_cfg)

    logits, cache = llama.forward(
        tiny_params, tokens[:, :5], positions[:, :5], KVCache.init(tiny_cfg, 1, 16), tiny_cfg
    )
    steps = [logits]
    for t in range(5, 8):
        logits, cache = llama.forward(
            tiny_params, tokens[:, t : t + 1], positions[:, t : t + 1], cache, tiny_cfg
        )
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=TINY_ATOL, rtol=1e-5)


@pytest.mark.numerics
def test_generate_greedy_equals_step_by_step_argmax(tiny_cfg, tiny_params):
    """Equal up to a near-tie of the step-by-step argmax (top-2 margin <= 2 * TINY_ATOL;
    measured: none, the smallest margin is 0.37)."""
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    result = jaxinfer.generate(tiny_params, [prompt], tiny_cfg, max_new_tokens=10)
    sequence, chose = list(prompt), []
    for _ in range(10):
        tokens = jnp.array([sequence])
        positions = jnp.arange(len(sequence))[None]
        cache = KVCache.init(tiny_cfg, 1, len(sequence))
        logits, _ = llama.forward(tiny_params, tokens, positions, cache, tiny_cfg)
        chose.append(np.asarray(logits[0, -1]))
        sequence.append(int(jnp.argmax(logits[0, -1])))
    assert_greedy_agrees_until_a_near_tie(result.tokens[0], sequence[len(prompt):],
                                          np.stack(chose), TINY_ATOL)
    assert result.lengths == [10] and result.finish_reasons == ["length"]


@pytest.mark.numerics
def test_rows_of_different_lengths_match_running_alone(tiny_cfg, tiny_params):
    """A batch of 3 runs other kernels than a batch of 1: equal up to a near-tie of the run
    alone (top-2 margin <= 2 * TINY_ATOL; measured: none, the smallest margin is 0.069)."""
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 200, 201], [77]]
    batched = jaxinfer.generate(tiny_params, prompts, tiny_cfg, max_new_tokens=12)
    for i, prompt in enumerate(prompts):
        alone = jaxinfer.generate(tiny_params, [prompt], tiny_cfg, max_new_tokens=12)
        assert_greedy_agrees_until_a_near_tie(
            batched.tokens[i], alone.tokens[0],
            _teacher_forced_logits(tiny_params, tiny_cfg, prompt, alone.tokens[0]), TINY_ATOL)


def test_row_stops_at_a_stop_token_and_keeps_it(tiny_cfg, tiny_params):
    prompt = [10, 20, 30]
    # The same batch of 2 as below, so the same kernels: only the stop differs.
    free = jaxinfer.generate(tiny_params, [prompt, prompt], tiny_cfg, max_new_tokens=12).tokens[0]
    stop = free[4]
    first = free.index(stop)
    result = jaxinfer.generate(
        tiny_params, [prompt, prompt], tiny_cfg, max_new_tokens=12, stop_token_ids=[stop]
    )
    assert result.tokens[0] == free[: first + 1]
    assert result.lengths[0] == first + 1
    assert result.finish_reasons == ["stop", "stop"]


def test_max_new_tokens_is_exact(tiny_cfg, tiny_params):
    for n in (1, 5, 17):
        result = jaxinfer.generate(tiny_params, [[1, 2]], tiny_cfg, max_new_tokens=n)
        assert result.lengths == [n] and len(result.tokens[0]) == n
        assert result.finish_reasons == ["length"]


def test_buckets_are_powers_of_two_with_floor_and_cap():
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert bucket(3, minimum=16) == 16
    assert bucket(600, minimum=16, cap=512) == 512


def test_same_bucket_reuses_the_compiled_programs(tiny_cfg, tiny_params):
    compiles = []
    listener = lambda event, duration, **_: compiles.append(event)  # noqa: E731
    jaxinfer.generate(tiny_params, [[1] * 20], tiny_cfg, max_new_tokens=20)
    programs = compiled_programs()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        # Prompt length 20 -> 27 and max_new 20 -> 30 stay in the (32, 32) buckets.
        result = jaxinfer.generate(tiny_params, [[2] * 27], tiny_cfg, max_new_tokens=30)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    backend_compiles = [e for e in compiles if e == "/jax/core/compile/backend_compile_duration"]
    assert backend_compiles == [] and compiled_programs() == programs
    assert result.timings["compile"] == 0.0
    # A new bucket does compile.
    jaxinfer.generate(tiny_params, [[2] * 40], tiny_cfg, max_new_tokens=30)
    assert compiled_programs() > programs


@pytest.mark.parametrize("speculative_method", ["none", "ngram"])
def test_precompile_on_the_weights_shapes_leaves_generate_nothing_to_compile(
        tiny_cfg, tiny_params, speculative_method):
    options = dict(max_new_tokens=12, speculative_method=speculative_method,
                   stop_token_ids=[3])
    seconds = precompile(weight_shapes(tiny_cfg), [[5, 6, 7] * 8], tiny_cfg, **options)
    programs = compiled_programs()
    result = jaxinfer.generate(tiny_params, [[5, 6, 7] * 7], tiny_cfg, **options)
    assert seconds > 0 and result.timings["compile"] == 0.0
    assert compiled_programs() == programs


@pytest.mark.parametrize(
    "tokens, max_new, message",
    [
        ([[]], 4, "prompt 0 is empty; a prompt needs at least one token"),
        ([], 4, "no prompts given"),
        ([[1] * 129], 4, "prompt 0 has 129 tokens; this model's context is 128"),
        ([[1] * 100], 40, "prompt 0 has 100 tokens and max_new_tokens=40: together more than "
                          "this model's context of 128 \\(at most 28 new tokens fit\\)"),
        ([[1, 2]], 0, "max_new_tokens=0; it must be at least 1"),
        ([[1, 2]], -3, "max_new_tokens=-3; it must be at least 1"),
        ([[1, 256]], 4, r"prompt 0 has token ids outside \[0, 256\): \[256\]"),
    ],
    ids=["empty-prompt", "no-prompts", "too-long", "too-long-with-new", "zero-new",
         "negative-new", "bad-token-id"],
)
def test_bad_input_is_a_clear_error(tiny_cfg, tiny_params, tokens, max_new, message):
    with pytest.raises(ValueError, match=message):
        jaxinfer.generate(tiny_params, tokens, tiny_cfg, max_new_tokens=max_new)


def test_sampling_params_count_must_match_prompts(tiny_cfg, tiny_params):
    with pytest.raises(ValueError, match="got 2 SamplingParams for 1 prompts"):
        jaxinfer.generate(tiny_params, [[1]], tiny_cfg, max_new_tokens=2,
                          sampling=[jaxinfer.SamplingParams()] * 2)


@pytest.mark.numerics
def test_real_model_greedy_output_is_the_same_alone_and_in_a_batch_of_4(smollm2):
    """A batch of 4 runs other kernels than a batch of 1 (logits within 1e-5 of their range;
    measured 1.2e-6): equal up to a near-tie of the run alone (measured: none, the smallest
    top-2 margin is 0.061)."""
    cfg, params, tokenizer = smollm2
    texts = ["The capital of France is", "def fibonacci(n):",
             "Once upon a time, in a small village", "List three colors:"]
    prompts = [tokenizer.encode(t) for t in texts]
    batched = jaxinfer.generate(params, prompts, cfg, max_new_tokens=24)
    alone = jaxinfer.generate(params, prompts[:1], cfg, max_new_tokens=24)
    logits = _teacher_forced_logits(params, cfg, prompts[0], alone.tokens[0])
    assert_greedy_agrees_until_a_near_tie(batched.tokens[0], alone.tokens[0], logits,
                                          1e-5 * float(np.ptp(logits)))


@pytest.mark.numerics
def test_bfloat16_policy_stays_close_to_float32(tiny_cfg, tiny_params):
    bf16 = tiny_cfg.with_dtype("bfloat16")
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), tiny_params)
    tokens = jnp.array([[5, 17, 99, 3, 250, 42]])
    positions = jnp.arange(6)[None]
    ref, _ = llama.forward(tiny_params, tokens, positions, KVCache.init(tiny_cfg, 1, 8), tiny_cfg)
    out, cache = llama.forward(params16, tokens, positions, KVCache.init(bf16, 1, 8), bf16)
    assert out.dtype == jnp.float32 and cache.k.dtype == jnp.bfloat16  # logits always fp32
    # bf16 keeps 8 mantissa bits: allow a few percent of the logit range.
    assert float(jnp.abs(out - ref).max()) < 0.03 * float(ref.max() - ref.min())
    result = jaxinfer.generate(params16, [[5, 17, 99]], bf16, max_new_tokens=4)
    assert result.lengths == [4]


def _prefill_logits(params, cfg, prompts, chunk, cache_len):
    """decode.prefill over `prompts` (padded to one array) in chunks of `chunk` (None: one
    call): the first tokens' logits [rows, vocab] and the cache."""
    from jaxinfer import decode
    from jaxinfer.sampling import SamplingArrays, SamplingParams

    rows, seq = len(prompts), max(map(len, prompts))
    tokens = np.zeros((rows, seq), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = jnp.array([len(p) for p in prompts], jnp.int32)
    zeros = jnp.zeros(rows, jnp.int32)
    run = jax.jit(lambda params, cache, tokens: decode.prefill(
        params, cache, tokens, lengths, SamplingArrays.stack([SamplingParams()] * rows), zeros,
        zeros + 4, jnp.full((rows, 1), -1, jnp.int32), cfg=cfg, chunk=chunk))
    _, cache, logits = run(params, KVCache.init(cfg, rows, cache_len), jnp.asarray(tokens))
    return np.asarray(logits), cache


@pytest.mark.numerics
@pytest.mark.parametrize("chunk", [16, 24, 50])
def test_chunked_prefill_matches_one_prefill(tiny_cfg, tiny_params, chunk):
    """Rows of lengths that end inside, at the edge of and before the last chunk, chunks
    that do and do not divide the prompt: the first tokens' logits and every prompt
    position's keys and values equal one unchunked prefill's within TINY_ATOL."""
    rng = np.random.default_rng(chunk)
    lengths = [100, 48, 7, 73]
    prompts = [rng.integers(0, tiny_cfg.vocab_size, n).tolist() for n in lengths]
    want, want_cache = _prefill_logits(tiny_params, tiny_cfg, prompts, None, 128)
    got, got_cache = _prefill_logits(tiny_params, tiny_cfg, prompts, chunk, 128)
    np.testing.assert_allclose(got, want, atol=TINY_ATOL, rtol=0)
    for row, n in enumerate(lengths):
        for name in ("k", "v"):  # [layers, batch, kv_heads, max_len, head_dim]
            np.testing.assert_allclose(getattr(got_cache, name)[:, row, :, :n],
                                       getattr(want_cache, name)[:, row, :, :n], atol=TINY_ATOL)


def test_chunked_prefill_runs_one_chunk_at_a_time(tiny_cfg, tiny_params):
    """The chunked program's scratch memory is that of one chunk, not of the whole prompt:
    its temporaries are several times smaller than one 128-token prefill's."""
    from jaxinfer.generate import _Batch, _prefill_jit

    def temp_bytes(chunk):
        batch = _Batch.of([[1] * 120] * 4, tiny_cfg, 8, None, (), data=1, chunk=chunk)
        compiled = _prefill_jit.lower(tiny_params, *batch.inputs,
                                      **batch.prefill_static(tiny_cfg)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(128), temp_bytes(16)
    assert chunked * 3 < whole, (chunked, whole)


@pytest.mark.numerics
def test_generate_with_chunked_prefill_agrees_with_one_prefill(tiny_cfg, tiny_params):
    """Equal up to a near-tie of the unchunked run (logits within TINY_ATOL, as above)."""
    prompts = [[(7 * i + 3) % 256 for i in range(90)], [5, 17, 99, 3]]
    whole = jaxinfer.generate(tiny_params, prompts, tiny_cfg, max_new_tokens=12,
                              prefill_chunk=128)
    chunked = jaxinfer.generate(tiny_params, prompts, tiny_cfg, max_new_tokens=12,
                                prefill_chunk=32)
    for row, prompt in enumerate(prompts):
        logits = _teacher_forced_logits(tiny_params, tiny_cfg, prompt, whole.tokens[row])
        assert_greedy_agrees_until_a_near_tie(chunked.tokens[row], whole.tokens[row], logits,
                                              TINY_ATOL)
    assert chunked.lengths == whole.lengths == [12, 12]


@pytest.mark.parametrize("chunk", [0, -5, 2.5, True])
def test_bad_prefill_chunk_is_a_clear_error(tiny_cfg, tiny_params, chunk):
    with pytest.raises(ValueError, match=f"prefill_chunk={chunk!r}; it must be a positive"):
        jaxinfer.generate(tiny_params, [[1, 2]], tiny_cfg, max_new_tokens=2,
                          prefill_chunk=chunk)


@pytest.mark.numerics
def test_real_model_long_prompt_in_chunks(smollm2):
    """A 1,300-token prompt (past the 1,024 the preset once capped prompt + output at) in
    chunks of 512, the last one partial: first-token logits within 1e-4 of their range of one
    unchunked prefill's, and generate() agrees with it up to a near-tie."""
    cfg, params, tokenizer = smollm2
    text = " ".join(f"Item {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 7 % 13} "
                    "marbles." for i in range(110))
    prompt = tokenizer.encode(text + " Which item holds the most marbles?")[:1300]
    assert len(prompt) == 1300
    result = jaxinfer.generate(params, [prompt], cfg, max_new_tokens=8, prefill_chunk=512)
    logits = _teacher_forced_logits(params, cfg, prompt, result.tokens[0])  # one forward
    got, _ = _prefill_logits(params, cfg, [prompt], 512, 1312)
    np.testing.assert_allclose(got[0], logits[0], atol=1e-4 * float(np.ptp(logits[0])), rtol=0)
    reference = [int(t) for t in logits.argmax(-1)]  # teacher-forced along generate's tokens
    assert_greedy_agrees_until_a_near_tie(result.tokens[0], reference, logits,
                                          1e-4 * float(np.ptp(logits)))
