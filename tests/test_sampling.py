"""Sampling: per-row parameters and seeds, checked against the distributions they define."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer.sampling import SamplingArrays, SamplingParams, sample

LOGITS = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.07, 0.03]]))


def draw_many(params: SamplingParams, n: int = 2000) -> np.ndarray:
    """n draws from LOGITS, one per step, as a histogram over the 5 tokens."""
    arrays = SamplingArrays.stack([params])
    tokens = jax.vmap(lambda step: sample(LOGITS, arrays, step)[0])(jnp.arange(n))
    return np.bincount(np.asarray(tokens), minlength=5) / n


def test_temperature_one_follows_the_distribution():
    freq = draw_many(SamplingParams(temperature=1.0, seed=1))
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.07, 0.03], atol=0.04)


def test_top_k_keeps_only_the_k_most_likely():
    freq = draw_many(SamplingParams(temperature=1.0, top_k=2, seed=2))
    assert freq[2:].sum() == 0
    np.testing.assert_allclose(freq[:2], [2 / 3, 1 / 3], atol=0.04)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.5 + 0.25 = 0.75 < 0.8, so the third token (0.15) is needed and the rest are cut.
    freq = draw_many(SamplingParams(temperature=1.0, top_p=0.8, seed=3))
    assert freq[3:].sum() == 0
    np.testing.assert_allclose(freq[:3], np.array([0.5, 0.25, 0.15]) / 0.9, atol=0.04)


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    freq = draw_many(SamplingParams(temperature=1.0, min_p=0.2, seed=4))  # cut below 0.1
    assert freq[3:].sum() == 0 and freq[:3].all()


def test_low_temperature_concentrates_on_the_top_token():
    assert draw_many(SamplingParams(temperature=0.05, seed=5))[0] > 0.99


def test_rows_sample_independently_with_their_own_params():
    logits = jnp.repeat(LOGITS, 3, axis=0)
    arrays = SamplingArrays.stack([
        SamplingParams(), SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=5.0)
    ])
    tokens = np.asarray(jax.vmap(lambda step: sample(logits, arrays, step))(jnp.arange(200)))
    assert (tokens[:, 0] == 0).all() and (tokens[:, 1] == 0).all()
    assert len(set(tokens[:, 2])) == 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature=-0.1 must be >= 0"),
        ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k=-1 must be >= 0"),
        ({"min_p": 2.0}, r"min_p=2.0 must be in \[0, 1\]"),
        ({"seed": -1}, r"seed=-1 must be in \[0, 2\*\*32\)"),
    ],
)
def test_out_of_range_sampling_params_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_same_seed_gives_the_same_tokens_and_other_seeds_differ(tiny_cfg, tiny_params):
    def run(seed, prompts=([4, 8, 15, 16, 23, 42],)):
        sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
        return jaxinfer.generate(tiny_params, list(prompts), tiny_cfg, max_new_tokens=24,
                                 sampling=sampling).tokens

    assert run(7) == run(7)
    assert run(7) != run(8)
    # A row's draws depend on its own seed only, not on the rest of the batch.
    assert run(7, ([4, 8, 15, 16, 23, 42], [1, 2, 3]))[0] == run(7)[0]


def test_top_k_one_equals_greedy(tiny_cfg, tiny_params):
    prompt = [[9, 9, 9, 1]]
    greedy = jaxinfer.generate(tiny_params, prompt, tiny_cfg, max_new_tokens=16)
    top1 = jaxinfer.generate(tiny_params, prompt, tiny_cfg, max_new_tokens=16,
                             sampling=SamplingParams(temperature=2.0, top_k=1, seed=3))
    assert top1.tokens == greedy.tokens
