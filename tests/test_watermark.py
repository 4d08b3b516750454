"""The green-list watermark (jaxinfer.watermark): the sampler's bias, the detector's score, and
that rows without it are untouched."""

from __future__ import annotations

import hashlib
import math

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import jaxinfer
from jaxinfer import watermark
from jaxinfer.sampling import SamplingArrays, SamplingParams, adjust_logits

KEY = "correct horse battery staple"
MASK = 0xFFFFFFFF


def reference_green(key: str, previous: int, token: int) -> bool:
    """The green rule rewritten with Python integers: murmur3 fmix32 over SHA-256 key words."""
    digest = hashlib.sha256(key.encode()).digest()
    k0, k1 = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")

    def fmix(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & MASK
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & MASK
        return h ^ (h >> 16)

    return fmix(fmix(fmix(previous ^ k0) ^ token) ^ k1) < int(watermark.GAMMA * 2**32)


def reference_z(tokens: list[int], key: str) -> tuple[float, float, int]:
    """The paper's one-proportion z-test over distinct (previous, token) pairs; scipy's p."""
    pairs = sorted(set(zip(tokens[:-1], tokens[1:], strict=True)))
    hits = sum(reference_green(key, p, t) for p, t in pairs)
    n, gamma = len(pairs), watermark.GAMMA
    z = (hits - gamma * n) / math.sqrt(n * gamma * (1 - gamma))
    return z, scipy.stats.norm.sf(z), n


def adjusted(rows: list[SamplingParams], logits, previous):
    batch = len(rows)
    return adjust_logits(jnp.asarray(logits), SamplingArrays.stack(rows), None,
                         jnp.full((batch, 1), -1), jnp.array(0), previous=jnp.asarray(previous))


def test_detector_matches_a_reimplementation_of_the_z_test(rng):
    for tokens in (rng.integers(0, 50_000, 300).tolist(), [5, 9, 5, 9, 5, 9, 7]):
        z, p, scored = watermark.detect(tokens, KEY)
        want_z, want_p, want_n = reference_z(tokens, KEY)
        assert scored == want_n
        assert z == pytest.approx(want_z, abs=1e-9)
        assert p == pytest.approx(want_p, rel=1e-6)


def test_sampler_adds_delta_exactly_on_the_detectors_green_list(rng):
    vocab, previous = 4096, [17, 3001]
    logits = rng.normal(size=(2, vocab)).astype(np.float32)
    rows = [SamplingParams(watermark_key=KEY), SamplingParams(watermark_key="another key")]
    got = np.asarray(adjusted(rows, logits, previous))
    for row, key in enumerate([KEY, "another key"]):
        want_green = np.array([reference_green(key, previous[row], t) for t in range(vocab)])
        np.testing.assert_allclose(got[row] - logits[row], watermark.DELTA * want_green,
                                   atol=1e-6)
        # About GAMMA of the vocabulary is green: 1024 expected, binomial sd ~28.
        assert abs(want_green.sum() - watermark.GAMMA * vocab) < 6 * 28


def test_rows_without_the_watermark_keep_their_logits_bitwise(rng):
    logits = rng.normal(size=(3, 1000)).astype(np.float32)
    rows = [SamplingParams(), SamplingParams(watermark_key=KEY), SamplingParams(temperature=0.7)]
    got = np.asarray(adjusted(rows, logits, [1, 2, 3]))
    np.testing.assert_array_equal(got[[0, 2]], logits[[0, 2]])
    assert not np.array_equal(got[1], logits[1])


def test_the_key_is_not_in_the_sampling_params_repr():
    params = SamplingParams(watermark_key=KEY)
    assert KEY not in repr(params) and KEY not in str(params)


def test_an_empty_key_is_refused():
    with pytest.raises(ValueError, match="non-empty string"):
        SamplingParams(watermark_key="")
    with pytest.raises(ValueError, match="key is empty"):
        watermark.detect([1, 2, 3], "")


def test_detector_needs_two_tokens():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        watermark.detect([7], KEY)


def test_greedy_output_without_the_watermark_is_the_same_beside_watermarked_rows(
        tiny_cfg, tiny_params):
    prompts = [[1, 2, 3, 4], [9, 8, 7], [5, 5, 5, 5, 5]]
    alone = jaxinfer.generate(tiny_params, prompts, tiny_cfg, max_new_tokens=16)
    mixed = jaxinfer.generate(tiny_params, prompts, tiny_cfg, max_new_tokens=16, sampling=[
        SamplingParams(), SamplingParams(watermark_key=KEY),
        SamplingParams(temperature=1.0, seed=3, watermark_key=KEY)])
    assert mixed.tokens[0] == alone.tokens[0]
    assert mixed.tokens[1] != alone.tokens[1]  # the watermark does steer greedy decoding


def test_watermarked_generations_score_high_and_plain_ones_low(tiny_cfg, tiny_params):
    # The random tiny model is near uniform over 256 tokens: ~71% of marked tokens are green,
    # z ~ 8 at 64 tokens; unmarked text is green at GAMMA, z ~ N(0, 1).
    prompts = [[1 + i, 40 + i, 90 + i] for i in range(4)]
    marked = [SamplingParams(temperature=1.0, seed=i, watermark_key=KEY) for i in range(3)]
    marked.append(SamplingParams(watermark_key=KEY))  # greedy is watermarked too
    plain = [SamplingParams(temperature=1.0, seed=i) for i in range(3)] + [SamplingParams()]
    out = jaxinfer.generate(tiny_params, prompts + prompts, tiny_cfg, max_new_tokens=64,
                            sampling=marked + plain, stop_token_ids=())
    assert all(len(tokens) == 64 for tokens in out.tokens)
    z = [watermark.detect(p[-1:] + t, KEY)[0] for p, t in zip(prompts * 2, out.tokens,
                                                               strict=True)]
    assert min(z[:3]) > 4, z
    assert max(z[4:7]) < 3, z
    assert watermark.detect(prompts[3][-1:] + out.tokens[3], "wrong key")[0] < 3
