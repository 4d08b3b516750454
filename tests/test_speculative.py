"""Speculative decoding (issue 15): n-gram drafts verified k at a time in the decode core give
the tokens plain decoding gives (greedy: the same argmax; sampled: the same draws from the
same keys, so the same distribution), in fewer model calls when the drafts are right."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer import decode, speculative
from jaxinfer.cache import KVCache
from jaxinfer.decode import NO_TOKEN, DecodeState
from jaxinfer.models import family
from jaxinfer.sampling import SamplingArrays, SamplingParams, sample
from tests.numerics import assert_greedy_agrees_until_a_near_tie, assert_logits_close

ATOL = 1e-4  # |logits| differences between a one-token step and a k + 1 token verify


@pytest.fixture(scope="module")
def params(tiny_params):
    return jax.tree_util.tree_map_with_path(  # larger weights: continuations that vary
        lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * 8, tiny_params)


def teacher_forced_logits(params, cfg, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """[len(tokens), vocab]: the raw logits that chose each of `tokens` after `prompt`."""
    sequence = jnp.array([prompt + tokens], jnp.int32)
    positions = jnp.arange(sequence.shape[1], dtype=jnp.int32)[None]
    logits, _ = family(cfg.architecture).forward(params, sequence, positions,
                                                 KVCache.init(cfg, 1, sequence.shape[1]), cfg)
    return np.asarray(logits[0, len(prompt) - 1: -1])


# --- n-gram drafts -------------------------------------------------------------------------

def test_ngram_drafts_follow_the_latest_occurrence_of_the_longest_suffix_that_recurs():
    history = jnp.array([
        [1, 2, 3, 9, 7, 3, 8, 1, 2, 3, 0, 0],  # "1 2 3" recurs (3-gram) though "3" is later
        [5, 6, 7, 8, 9, 5, 6, 4, 4, 6, 0, 0],  # "6" alone recurs; its latest occurrence wins
        [1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 0],  # nothing recurs
        [4, 2, 4, 2, 4, 0, 0, 0, 0, 0, 0, 0],  # the draft never reaches past the newest token
    ], jnp.int32)
    position = jnp.array([9, 9, 5, 4])
    draft = speculative.ngram_draft(history, position, 4, min_ngram=1)
    assert draft.tolist() == [[9, 7, 3, 8], [4, 4, 6, NO_TOKEN], [NO_TOKEN] * 4,
                              [2, 4, NO_TOKEN, NO_TOKEN]]
    default = speculative.ngram_draft(history, position, 4)  # 2-grams and longer
    assert default[1].tolist() == [NO_TOKEN] * 4 and default[0].tolist() == draft[0].tolist()


def test_generate_rejects_unknown_methods_and_draft_counts_outside_1_to_7(tiny_cfg, params):
    for method, k in (("draft", 4), ("ngram", 0), ("ngram", 8)):
        with pytest.raises(ValueError, match="speculative_method|num_speculative_tokens"):
            jaxinfer.generate(params, [[1, 2]], tiny_cfg, max_new_tokens=2,
                              speculative_method=method, num_speculative_tokens=k)


# --- the decode core -----------------------------------------------------------------------

def test_record_many_appends_up_to_a_stop_id_or_the_budget_and_nothing_to_done_rows():
    state = DecodeState.start(first=jnp.array([4, 9, 4, 1]), position=jnp.array([3, 5, 0, 2]),
                              count=jnp.array([0, 0, 0, 0]), max_tokens=jnp.array([9, 3, 9, 9]),
                              stop_ids=jnp.array([[7, NO_TOKEN]] * 4),
                              sampling=SamplingArrays.stack([SamplingParams()] * 4),
                              live=jnp.array([True, True, False, True]))
    tokens = jnp.array([[1, 7, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
    state, emitted, n = state.record_many(tokens, jnp.array([4, 4, 4, 2]))
    assert n.tolist() == [2, 2, 0, 2]  # a stop id; a budget of 3 (one spent); done; available
    assert emitted.tolist() == [[1, 7, -1, -1], [1, 2, -1, -1], [-1] * 4, [5, 6, -1, -1]]
    assert state.done.tolist() == [True, True, True, False]
    assert state.stopped.tolist() == [True, False, False, False]
    assert state.last.tolist() == [7, 2, 4, 6] and state.position.tolist() == [5, 7, 0, 4]
    assert state.count.tolist() == [3, 3, 1, 3]


ROWS = [SamplingParams(), SamplingParams(frequency_penalty=0.8, repetition_penalty=1.3),
        SamplingParams(temperature=0.9, top_k=40, seed=11)]


K = 4
PREFILL = jax.jit(decode.prefill, static_argnames="cfg")
STEP = jax.jit(decode.step, static_argnames="cfg")
VERIFY = jax.jit(decode.speculative_step, static_argnames="cfg")


def _prefilled(params, cfg):
    prompts = np.array([[5, 17, 99, 3, 250, 42, 7, 8], [3, 1, 4, 1, 5, 9, 2, 6],
                        [77, 78, 79, 80, 81, 82, 83, 84]], np.int32)
    sampling = jax.tree.map(jnp.asarray, SamplingArrays.stack(ROWS))
    rows = len(ROWS)
    state, cache, _ = PREFILL(
        params, KVCache.init(cfg, rows, 32), jnp.asarray(prompts), jnp.full(rows, 8),
        sampling, jnp.zeros(rows, jnp.int32), jnp.full(rows, 20), jnp.full((rows, 1), NO_TOKEN),
        cfg=cfg)
    return state, cache


@pytest.fixture(scope="module")
def plain_steps(tiny_cfg, params):
    """K + 1 plain steps: their tokens [rows, K + 1], logits [rows, K + 1, vocab], states."""
    state, cache = _prefilled(params, tiny_cfg)
    tokens, logits, states = [], [], []
    for _ in range(K + 1):
        cache, state, token, step_logits = STEP(params, cache, state, cfg=tiny_cfg)
        tokens.append(token)
        logits.append(step_logits)
        states.append(state)
    return jnp.stack(tokens, 1), jnp.stack(logits, 1), states


@pytest.mark.numerics
def test_a_verify_step_given_the_plain_steps_tokens_accepts_them_all_with_their_logits(
        tiny_cfg, params, plain_steps):
    k = K
    want_tokens, want_logits, states = plain_steps
    state, cache = _prefilled(params, tiny_cfg)
    _, got, emitted, n, accepted, logits = VERIFY(params, cache, state, want_tokens[:, :k],
                                                  cfg=tiny_cfg)
    assert_logits_close(logits, want_logits, ATOL)
    assert emitted.tolist() == want_tokens.tolist()  # greedy, penalized and sampled rows
    assert n.tolist() == [k + 1] * 3 and accepted.tolist() == [k] * 3
    for field in ("last", "position", "count", "done"):
        assert getattr(got, field).tolist() == getattr(states[-1], field).tolist(), field
    assert np.array_equal(got.counts.output, states[-1].counts.output)


@pytest.mark.numerics
def test_a_verify_step_keeps_the_drafts_before_the_first_wrong_one_and_the_models_token(
        tiny_cfg, params, plain_steps):
    want_tokens, _, states = plain_steps
    draft = want_tokens[:, :K].at[:, 2].set((want_tokens[:, 2] + 1) % tiny_cfg.vocab_size)
    state, cache = _prefilled(params, tiny_cfg)
    _, got, emitted, n, accepted, _ = VERIFY(params, cache, state, draft, cfg=tiny_cfg)
    assert n.tolist() == [3] * 3 and accepted.tolist() == [2] * 3
    assert emitted[:, :3].tolist() == want_tokens[:, :3].tolist()
    assert (emitted[:, 3:] == NO_TOKEN).all()
    assert got.position.tolist() == states[2].position.tolist()
    assert np.array_equal(got.counts.output, states[2].counts.output)


def _chi_square(observed: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * observed.sum()
    return float(((observed - expected) ** 2 / expected).sum())


def test_the_speculative_sampler_draws_each_token_from_the_models_distribution():
    """Rejection sampling against a point-mass draft, over 20,000 rows with their own seeds:
    the first token is distributed as p0 and equals the plain sampler's draw from the same
    key; the draft is accepted with probability p0(d); a rejected row's token follows the
    residual p0 without d; an accepted row's next token follows p1."""
    rows, vocab = 20_000, 6
    p = np.array([[0.3, 0.25, 0.2, 0.15, 0.07, 0.03],
                  [0.05, 0.1, 0.4, 0.2, 0.15, 0.1],
                  [0.1, 0.1, 0.2, 0.2, 0.2, 0.2]])
    draft = jnp.tile(jnp.array([[1, 2]], jnp.int32), (rows, 1))
    logits = jnp.tile(jnp.log(jnp.asarray(p, jnp.float32))[None], (rows, 1, 1))
    sampling = jax.tree.map(jnp.asarray, SamplingArrays.stack(
        [SamplingParams(temperature=1.0, seed=seed) for seed in range(rows)]))
    state = DecodeState.start(jnp.zeros(rows, jnp.int32), jnp.full(rows, 4),
                              jnp.zeros(rows, jnp.int32), jnp.full(rows, 99),
                              jnp.full((rows, 1), NO_TOKEN), sampling)
    _, emitted, n, accepted = jax.jit(decode.verify)(logits, state, draft)
    emitted, n = np.asarray(emitted), np.asarray(n)

    plain = sample(logits[:, 0], sampling, state.count)
    assert np.array_equal(emitted[:, 0], np.asarray(plain))
    first = np.bincount(emitted[:, 0], minlength=vocab)
    # Critical values of chi-square at p = 0.001: 20.5 (5 degrees of freedom), 18.5 (4).
    assert _chi_square(first, p[0]) < 20.5
    took = emitted[:, 0] == 1
    assert abs(took.mean() - p[0, 1]) < 4 * np.sqrt(p[0, 1] * (1 - p[0, 1]) / rows)
    assert (n[~took] == 1).all() and (n[took] >= 2).all()
    residual = np.delete(first, 1)
    assert _chi_square(residual, np.delete(p[0], 1) / (1 - p[0, 1])) < 18.5
    second = np.bincount(emitted[took, 1], minlength=vocab)
    assert _chi_square(second, p[1]) < 20.5
    assert (np.asarray(accepted) == (n - 1)).all()


# --- generate() ----------------------------------------------------------------------------

PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 8], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [77, 78],
           [5, 17, 99, 3, 250, 42, 7, 8], [9, 9, 9, 9, 9, 9], [200, 100, 200, 100, 200]]
SAMPLING = [SamplingParams(), SamplingParams(), SamplingParams(temperature=0.8, seed=5),
            SamplingParams(min_tokens=12),  # row 0's prompt, its stop id masked for a while
            SamplingParams(frequency_penalty=0.5, presence_penalty=0.3),
            SamplingParams(ignore_eos=True, temperature=1.0, top_p=0.9, seed=123)]
MAX_NEW = 21  # no multiple of k + 1


@pytest.fixture(scope="module")
def looping(tiny_params):
    """Weights x 4: continuations that vary at first and then repeat, so drafts get accepted."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * 4, tiny_params)


@pytest.fixture(scope="module")
def plain(tiny_cfg, looping):
    """The reference: no speculation; the stop id is a token row 0 first draws 6th or later."""
    free = jaxinfer.generate(looping, PROMPTS[:1], tiny_cfg, max_new_tokens=MAX_NEW).tokens[0]
    at = next(i for i in range(5, MAX_NEW) if free[i] not in free[:i])
    stop = free[at]
    result = jaxinfer.generate(looping, PROMPTS, tiny_cfg, max_new_tokens=MAX_NEW,
                               sampling=SAMPLING, stop_token_ids=[stop])
    assert result.finish_reasons[0] == "stop" and result.lengths[0] == at + 1
    assert result.lengths[3] > 12  # min_tokens kept the stop id out
    return result, stop


@pytest.mark.numerics
@pytest.mark.parametrize("k", range(1, 8))
def test_generate_gives_the_same_tokens_with_and_without_speculation(tiny_cfg, looping, plain,
                                                                     k):
    want, stop = plain
    got = jaxinfer.generate(looping, PROMPTS, tiny_cfg, max_new_tokens=MAX_NEW,
                            sampling=SAMPLING, stop_token_ids=[stop],
                            speculative_method="ngram", num_speculative_tokens=k)
    for row, prompt in enumerate(PROMPTS):
        if got.tokens[row] != want.tokens[row] and SAMPLING[row] == SamplingParams():
            assert_greedy_agrees_until_a_near_tie(  # plain greedy rows may split at a near-tie
                got.tokens[row], want.tokens[row],
                teacher_forced_logits(looping, tiny_cfg, prompt, want.tokens[row]), ATOL)
        else:
            assert got.tokens[row] == want.tokens[row], row
    assert got.finish_reasons == want.finish_reasons
    assert got.decode_steps <= want.decode_steps
    assert all(0 <= a <= d for a, d in zip(got.accepted_tokens, got.draft_tokens, strict=True))
    assert sum(got.accepted_tokens) > 0  # some steps kept several tokens


def test_speculation_is_off_by_default_and_reports_one_model_call_per_token(plain):
    result, _ = plain
    assert result.decode_steps == max(result.lengths) - 1
    assert result.accepted_tokens == result.draft_tokens == [0] * len(PROMPTS)


# --- SmolLM2 -------------------------------------------------------------------------------

CODE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"


@pytest.mark.numerics
def test_smollm2_copying_code_accepts_drafts_and_keeps_its_greedy_tokens(smollm2):
    messages = [{"role": "user", "content": "Repeat this code exactly:\n" + CODE}]
    prompt = smollm2.tokenizer.encode(
        smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True),
        add_bos=False)
    options = dict(max_new_tokens=40, stop_token_ids=smollm2.tokenizer.stop_ids)
    want = jaxinfer.generate(smollm2.params, [prompt], smollm2.config, **options)
    for k in (3, 7):
        got = jaxinfer.generate(smollm2.params, [prompt], smollm2.config, **options,
                                speculative_method="ngram", num_speculative_tokens=k)
        if got.tokens != want.tokens:
            assert_greedy_agrees_until_a_near_tie(
                got.tokens[0], want.tokens[0],
                teacher_forced_logits(smollm2.params, smollm2.config, prompt, want.tokens[0]),
                ATOL)
        # Measured: 30 model calls without, 15 at k = 3 and 11 at k = 7.
        assert got.decode_steps <= 0.6 * want.decode_steps, (k, got.decode_steps)
        assert got.accepted_tokens[0] >= 0.4 * want.lengths[0]


# --- the serving engine --------------------------------------------------------------------

@pytest.mark.numerics
def test_the_serving_engine_speculates_to_the_tokens_generate_gives(tiny_cfg, looping):
    from jaxinfer.serving import EngineConfig
    from jaxinfer.serving.engine import Engine
    from tests.test_decode import engine_tokens

    model = jaxinfer.Model(tiny_cfg, looping, None)
    config = EngineConfig(max_batch_size=4, max_seq_len=64, page_size=8, num_pages=40,
                          decode_steps=3, speculative_method="ngram", num_speculative_tokens=3)
    engine = Engine(model, config)
    assert engine.positions_per_call == 12
    counts, generate = [], engine.generate

    def counted(*args, **kwargs):
        out = generate(*args, **kwargs)
        counts.append(engine.last_speculation)
        return out

    engine.generate = counted
    prompts, samplings = PROMPTS[:4], SAMPLING[:3] + [SamplingParams()]
    got = engine_tokens(engine, prompts, samplings, 16)
    want = jaxinfer.generate(looping, prompts, tiny_cfg, max_new_tokens=16, sampling=samplings)
    assert got == want.tokens
    drafts, draft_tokens, accepted, *per_position = np.sum(counts, axis=0)
    assert 0 < accepted <= draft_tokens and drafts <= draft_tokens  # some drafts were kept
    assert per_position[0] >= per_position[1] >= per_position[2] and sum(per_position) == accepted


@pytest.mark.numerics
def test_a_speculating_scheduler_streams_generates_tokens_and_counts_vllms_metrics(
        tiny_cfg, looping, smollm2_path):
    """Through the scheduler (page growth for steps * (k + 1) positions, packed slots, the
    metrics): greedy requests arriving together stream generate()'s tokens, and the
    spec_decode_* counters add up."""
    from prometheus_client import generate_latest

    from jaxinfer.checkpoints import gguf_vocab
    from jaxinfer.serving import EngineConfig
    from jaxinfer.serving.engine import Engine
    from jaxinfer.serving.metrics import Metrics
    from jaxinfer.serving.scheduler import Scheduler
    from tests.test_prefix_caching import run, settle

    config = EngineConfig(max_batch_size=4, max_seq_len=64, page_size=8, num_pages=40,
                          decode_steps=2, speculative_method="ngram", num_speculative_tokens=3)
    metrics = Metrics("tiny")
    tokenizer = gguf_vocab.build(smollm2_path)  # the scheduler needs stop ids
    scheduler = Scheduler(Engine(jaxinfer.Model(tiny_cfg, looping, tokenizer), config), metrics)
    scheduler.start()
    try:
        prompts = PROMPTS[:5]  # five requests on four slots: one waits for a free slot
        sinks = run(scheduler, prompts, 19)
        settle(scheduler)
    finally:
        scheduler.stop(10)
    want = jaxinfer.generate(looping, prompts, tiny_cfg, max_new_tokens=19,
                             stop_token_ids=tokenizer.stop_ids)
    assert [sink.tokens for sink in sinks] == want.tokens
    text = generate_latest(metrics.registry).decode()

    def total(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(f"jaxinfer:{name}"))

    drafts = total("spec_decode_num_drafts_total")
    tokens = total("spec_decode_num_draft_tokens_total")
    accepted = total("spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= tokens <= 3 * drafts  # some drafts were kept, at most k per draft
    assert total("spec_decode_num_accepted_tokens_per_pos_total") == accepted


# --- the HTTP server -----------------------------------------------------------------------

def test_a_speculating_server_answers_as_generate_does_streamed_or_not(smollm2):
    """The real SmolLM2 served with n-gram speculation: a greedy chat completion, whole and
    streamed, copies the code as generate() does (the same text, up to a near-tie: the
    server decodes 2 rows at once), and /metrics counts the accepted drafts."""
    import httpx

    from jaxinfer.serving import EngineConfig
    from jaxinfer.serving.engine import Engine
    from jaxinfer.serving.server import ServerState
    from tests.test_serving import MODEL, serving

    config = EngineConfig(max_batch_size=2, max_seq_len=256, page_size=16, num_pages=40,
                          decode_steps=2, speculative_method="ngram", num_speculative_tokens=4)
    messages = [{"role": "user", "content": "Repeat this code exactly:\n" + CODE}]
    prompt = smollm2.tokenizer.encode(
        smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True),
        add_bos=False)
    want = jaxinfer.generate(smollm2.params, [prompt], smollm2.config, max_new_tokens=40,
                             stop_token_ids=smollm2.tokenizer.stop_ids, speculative_method="ngram",
                             num_speculative_tokens=4)
    want_text = smollm2.tokenizer.decode(
        [t for t in want.tokens[0] if t not in smollm2.tokenizer.stop_ids])
    state = ServerState(MODEL)
    with serving(state) as url:
        state.attach(Engine(smollm2, config))
        body = {"model": MODEL, "messages": messages, "max_tokens": 40, "temperature": 0}
        whole = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
        assert whole.status_code == 200, whole.text
        answer = whole.json()["choices"][0]["message"]["content"]
        if answer != want_text:
            want_ids = [t for t in want.tokens[0] if t not in smollm2.tokenizer.stop_ids]
            assert_greedy_agrees_until_a_near_tie(
                smollm2.tokenizer.encode(answer, add_bos=False), want_ids,
                teacher_forced_logits(smollm2.params, smollm2.config, prompt, want_ids), ATOL)
        assert "return a - b" in answer  # it copies the code (renaming the functions)
        streamed = ""
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True},
                          timeout=300) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for choice in json.loads(line.removeprefix("data: "))["choices"]:
                        streamed += choice["delta"].get("content") or ""
        assert streamed == answer
        metrics = httpx.get(f"{url}/metrics").text
    accepted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("jaxinfer:spec_decode_num_accepted_tokens_total"))
    assert accepted >= 0.4 * 2 * want.lengths[0]  # both requests copy most of their answer
