"""Draft heads (issue 15): heads distilled with optax from a model's own answers propose the
tokens after each row's newest one; verified in the decode core they leave greedy tokens
and seeded draws as they are, and trained heads get far more of them accepted than untrained
ones."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer import distill, draft_heads
from jaxinfer.checkpoints import CheckpointError
from jaxinfer.checkpoints import draft as draft_checkpoint
from jaxinfer.sampling import SamplingParams
from tests import test_speculative
from tests.numerics import assert_greedy_agrees_until_a_near_tie
from tests.test_speculative import ATOL, MAX_NEW, PROMPTS, SAMPLING, teacher_forced_logits

looping, plain = test_speculative.looping, test_speculative.plain  # fixtures shared with it

VOCAB = 256


def _permutation(token):
    return (37 * token + 11) % VOCAB  # a bijection of 0..255 with no fixed point


@pytest.fixture(scope="module")
def cycling(tiny_cfg, tiny_params):
    """A tiny model whose greedy continuation of token t is _permutation(t): its layers scaled
    down so the final hidden state is about the newest token's normalized embedding, and an
    unembedding whose row _permutation(t) is that embedding. Its continuations are
    learnable, unlike a random model's (about uniform; nothing for heads to learn)."""
    cfg = tiny_cfg.__class__(**{**tiny_cfg.__dict__, "tie_embeddings": False})
    params = {**tiny_params,
              "layers": jax.tree.map(lambda x: x * 0.05, tiny_params["layers"])}
    embed = params["embed"]
    unit = embed / jnp.linalg.norm(embed, axis=-1, keepdims=True)
    order = jnp.argsort(_permutation(jnp.arange(VOCAB)))  # row v: the t with perm(t) = v
    params["lm_head"] = 12.0 * unit[order]
    return cfg, params


@pytest.fixture(scope="module")
def cycling_data(cycling):
    cfg, params = cycling
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCAB, rng.integers(2, 6)).tolist() for _ in range(200)]
    options = distill.DistillOptions(num_heads=3, max_new_tokens=24, generate_batch=64)
    return distill.make_dataset(jaxinfer.Model(cfg, params, None), prompts, options,
                                progress=False)


def _random_heads(cfg, num_heads=7, scale=0.3):
    heads = draft_heads.init(jax.random.key(1), cfg.embed_dim, num_heads)
    heads["w_out"] = scale * jax.random.normal(jax.random.key(2), heads["w_out"].shape)
    return heads


def test_the_cycling_model_continues_each_token_with_its_permutation(cycling):
    cfg, params = cycling
    tokens = jaxinfer.generate(params, [[3, 200, 17]], cfg, max_new_tokens=12).tokens[0]
    assert tokens == [_permutation(t) for t in [17] + tokens[:-1]]


@pytest.mark.numerics
@pytest.mark.parametrize("k", [1, 4, 7])
def test_generate_with_draft_heads_gives_the_tokens_plain_decoding_gives(tiny_cfg, looping,
                                                                        plain, k):
    want, stop = plain
    got = jaxinfer.generate({**looping, "draft": _random_heads(tiny_cfg)}, PROMPTS, tiny_cfg,
                            max_new_tokens=MAX_NEW, sampling=SAMPLING, stop_token_ids=[stop],
                            speculative_method="draft", num_speculative_tokens=k)
    for row, prompt in enumerate(PROMPTS):
        if got.tokens[row] != want.tokens[row] and SAMPLING[row] == SamplingParams():
            assert_greedy_agrees_until_a_near_tie(
                got.tokens[row], want.tokens[row],
                teacher_forced_logits(looping, tiny_cfg, prompt, want.tokens[row]), ATOL)
        else:
            assert got.tokens[row] == want.tokens[row], row
    assert got.finish_reasons == want.finish_reasons
    assert all(0 <= a <= d for a, d in zip(got.accepted_tokens, got.draft_tokens, strict=True))


@pytest.mark.numerics
def test_smollm2_with_draft_heads_keeps_its_greedy_tokens(smollm2):
    prompt = smollm2.tokenizer.encode(smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True), add_bos=False)
    options = dict(max_new_tokens=24, stop_token_ids=smollm2.tokenizer.stop_ids)
    want = jaxinfer.generate(smollm2.params, [prompt], smollm2.config, **options)
    heads = _random_heads(smollm2.config, num_heads=3, scale=0.02)
    got = jaxinfer.generate({**smollm2.params, "draft": heads}, [prompt], smollm2.config,
                            **options, speculative_method="draft", num_speculative_tokens=3)
    if got.tokens != want.tokens:
        assert_greedy_agrees_until_a_near_tie(
            got.tokens[0], want.tokens[0],
            teacher_forced_logits(smollm2.params, smollm2.config, prompt, want.tokens[0]), ATOL)
    assert got.draft_tokens[0] == 3 * got.decode_steps  # heads always propose k tokens


def test_trained_heads_are_accepted_far_more_often_than_untrained_ones(cycling, cycling_data,
                                                                      tmp_path):
    cfg, params = cycling
    model = jaxinfer.Model(cfg, params, None)
    options = distill.DistillOptions(num_heads=3, steps=150, batch_size=128,
                                     learning_rate=1e-2, warmup_steps=10, checkpoint_every=50)
    untrained = draft_heads.init(jax.random.key(0), cfg.embed_dim, 3)
    before = distill.evaluate(model, untrained, cycling_data)
    heads = distill.train(model, cycling_data, options, tmp_path, progress=False)
    after = distill.evaluate(model, heads, cycling_data)
    # Untrained heads propose the newest token again, which never follows itself here.
    assert before.max() < 0.05, before
    assert after[0] > 0.9 and after[2] > 0.5, after  # measured: about 1.0, 1.0, 0.99

    prompts = [[9, 4, 77], [123, 5], [250, 1, 2, 3]]
    want = jaxinfer.generate(params, prompts, cfg, max_new_tokens=32)
    runs = {name: jaxinfer.generate({**params, "draft": h}, prompts, cfg, max_new_tokens=32,
                                    speculative_method="draft", num_speculative_tokens=3)
            for name, h in (("untrained", untrained), ("trained", heads))}
    for got in runs.values():
        assert got.tokens == want.tokens
    assert sum(runs["trained"].accepted_tokens) >= 0.6 * sum(want.lengths)
    assert sum(runs["untrained"].accepted_tokens) <= 0.05 * sum(want.lengths)
    assert runs["trained"].decode_steps <= 0.4 * want.decode_steps


def test_training_resumes_from_its_latest_checkpoint_to_the_same_heads(cycling, cycling_data,
                                                                      tmp_path):
    import shutil

    cfg, params = cycling
    model = jaxinfer.Model(cfg, params, None)
    options = distill.DistillOptions(num_heads=2, steps=12, batch_size=64, checkpoint_every=4)
    whole = distill.train(model, cycling_data, options, tmp_path, progress=False)
    shutil.rmtree(tmp_path / distill.TRAIN_DIR / "12")  # as if stopped before step 12's save
    assert sorted(p.name for p in (tmp_path / distill.TRAIN_DIR).iterdir()) == ["8"]
    resumed = distill.train(model, cycling_data, options, tmp_path, progress=False)
    for name in whole:
        np.testing.assert_allclose(resumed[name], whole[name], rtol=1e-6, atol=1e-7)


def test_saved_heads_load_for_their_model_only(tiny_cfg, tmp_path):
    heads = _random_heads(tiny_cfg, num_heads=3)
    draft_checkpoint.save(tmp_path / "d", heads, tiny_cfg, {"steps": 5})
    loaded = draft_checkpoint.load(tmp_path / "d", tiny_cfg)
    for name in heads:
        assert np.array_equal(loaded[name], heads[name])
    other = tiny_cfg.__class__(**{**tiny_cfg.__dict__, "embed_dim": 32})
    with pytest.raises(CheckpointError, match="trained for another model.*embed_dim 64"):
        draft_checkpoint.load(tmp_path / "d", other)
    with pytest.raises(CheckpointError, match="not draft heads"):
        draft_checkpoint.load(tmp_path, tiny_cfg)


def test_draft_speculation_needs_heads_enough_for_k(tiny_cfg, looping):
    with pytest.raises(ValueError, match="needs draft heads.*draft=PATH"):
        jaxinfer.generate(looping, [[1, 2]], tiny_cfg, max_new_tokens=2,
                          speculative_method="draft")
    with pytest.raises(ValueError, match="num_speculative_tokens=4; the draft has 3 heads"):
        jaxinfer.generate({**looping, "draft": _random_heads(tiny_cfg, 3)}, [[1, 2]], tiny_cfg,
                          max_new_tokens=2, speculative_method="draft", num_speculative_tokens=4)


@pytest.mark.numerics
def test_the_serving_engine_speculates_with_draft_heads_to_generates_tokens(cycling):
    from jaxinfer.serving import EngineConfig
    from jaxinfer.serving.engine import Engine
    from tests.test_decode import engine_tokens

    cfg, params = cycling
    heads = _random_heads(cfg, num_heads=3, scale=0.05)
    config = EngineConfig(max_batch_size=4, max_seq_len=64, page_size=8, num_pages=40,
                          decode_steps=2, speculative_method="draft", num_speculative_tokens=3)
    engine = Engine(jaxinfer.Model(cfg, {**params, "draft": heads}, None), config)
    prompts = [[9, 4, 77], [123, 5], [250, 1, 2, 3], [7]]
    samplings = [SamplingParams(), SamplingParams(temperature=0.7, seed=3), SamplingParams(),
                 SamplingParams(frequency_penalty=0.4)]
    got = engine_tokens(engine, prompts, samplings, 14)
    want = jaxinfer.generate(params, prompts, cfg, max_new_tokens=14, sampling=samplings)
    assert got == want.tokens


def test_the_distill_command_trains_heads_that_generate_uses(smollm2_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Say the number {i} in words." for i in range(10)) + "\n")
    out = tmp_path / "draft"
    command = [sys.executable, "-m", "jaxinfer.launch.distill", f"--prompts={prompts}",
               f"--output={out}", "--max_new_tokens=8", "--steps=3", "--num_heads=2",
               "--batch_size=16", "--checkpoint_every=2"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "acceptance_trained" in run.stderr and (out / "draft.json").is_file()
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)  # resumes
    assert run.returncode == 0 and "answers from" in run.stderr, run.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "jaxinfer.launch.generate", "--nochat",
                          "--prompt=one two three", "--max_new_tokens=6",
                          "--speculative_method=draft", "--num_speculative_tokens=2",
                          f"--speculative_model={out}"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "[speculative draft:" in run.stderr
