"""The paged KV cache: the model gives the same logits through it as through the dense cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.cache import KVCache, PagedKVCache
from jaxinfer.models import family
from jaxinfer.pallas import reference
from tests.numerics import assert_top1_agrees_where_decisive

# Both caches run the same fp32 math in a different order of gathers: equal up to rounding.
ATOL = 1e-4


def shuffled_page_table(rng, lengths, page_size, pages_per_seq, num_pages) -> np.ndarray:
    """Each row gets just enough pages for its length, drawn in random order from 1..; the
    rest of its table stays 0 (the scratch page)."""
    free = list(rng.permutation(np.arange(1, num_pages)))
    table = np.zeros((len(lengths), pages_per_seq), np.int32)
    for row, length in enumerate(lengths):
        for i in range(-(-length // page_size)):
            table[row, i] = free.pop()
    return table


def run_both(cfg, params, prompts, decode_steps, rng, page_size=4, pages_per_seq=8):
    """Prefill `prompts` (padded to one length, positions 0..seq-1 as generate() does), then
    `decode_steps` single-token steps, through a dense and a paged cache. Returns per-step
    (dense logits, paged logits, mask of rows/tokens that matter)."""
    model = family(cfg.architecture)
    forward = jax.jit(model.forward, static_argnames="cfg")
    batch, seq = len(prompts), max(map(len, prompts))
    lengths = np.array([len(p) for p in prompts])
    tokens = np.zeros((batch, seq), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    num_pages = 1 + batch * pages_per_seq
    table = shuffled_page_table(rng, lengths + decode_steps, page_size, pages_per_seq, num_pages)
    dense = KVCache.init(cfg, batch, pages_per_seq * page_size)
    paged = PagedKVCache.init(cfg, num_pages, page_size, batch, pages_per_seq)
    paged = PagedKVCache(paged.k_pages, paged.v_pages, jnp.asarray(table))

    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    want, dense = forward(params, tokens, positions, dense, cfg)
    got, paged = forward(params, tokens, positions, paged, cfg)
    steps = [(want, got, np.arange(seq)[None, :] < lengths[:, None])]
    for step in range(decode_steps):
        next_tokens = rng.integers(0, cfg.vocab_size, (batch, 1)).astype(np.int32)
        positions = jnp.asarray(lengths[:, None] + step, jnp.int32)
        want, dense = forward(params, next_tokens, positions, dense, cfg)
        got, paged = forward(params, next_tokens, positions, paged, cfg)
        steps.append((want, got, np.ones((batch, 1), bool)))
    return steps


@pytest.mark.numerics
def test_tiny_model_logits_match_dense_cache_through_prefill_and_decode(
    tiny_cfg, tiny_params, rng
):
    prompts = [list(rng.integers(0, tiny_cfg.vocab_size, n)) for n in (5, 11, 8)]
    for want, got, valid in run_both(tiny_cfg, tiny_params, prompts, 5, rng):
        want, got = np.asarray(want)[valid], np.asarray(got)[valid]
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.numerics
def test_real_model_logits_match_dense_cache_through_prefill_and_decode(smollm2, rng):
    """Logits within ATOL of their range (measured: bit-identical here); the same top-1 wherever the
    dense cache's is decisive (top-2 margin over twice that)."""
    cfg, params, tokenizer = smollm2
    prompts = [tokenizer.encode(t) for t in ("The capital of France is", "Once upon a")]
    for want, got, valid in run_both(cfg, params, prompts, 3, rng):
        want, got = np.asarray(want)[valid], np.asarray(got)[valid]
        print(f"max |diff| / range {np.abs(got - want).max() / np.ptp(want):.1e}")
        np.testing.assert_allclose(got, want, atol=ATOL * np.ptp(want), rtol=0)
        assert_top1_agrees_where_decisive(got, want, ATOL * np.ptp(want))


def test_update_writes_each_token_into_its_page_and_offset(tiny_cfg):
    cache = PagedKVCache.init(tiny_cfg, num_pages=6, page_size=4, batch=2, pages_per_seq=2)
    cache = PagedKVCache(cache.k_pages, cache.v_pages, jnp.array([[3, 5], [2, 0]], jnp.int32))
    positions = jnp.array([[0, 5], [2, 7]], jnp.int32)  # row 1, position 7: page index 1 -> 0
    k = jnp.arange(1, 5, dtype=jnp.float32).reshape(2, 2, 1, 1)
    k = jnp.broadcast_to(k, (2, 2, tiny_cfg.n_kv_heads, tiny_cfg.head_dim))
    cache = cache.update(1, positions, k, -k)
    pages = np.asarray(cache.k_pages[1, 0, :, :, 0])  # [page, offset]
    assert pages[3, 0] == 1 and pages[5, 1] == 2 and pages[2, 2] == 3
    assert pages[0, 3] == 4  # past the row's pages: the scratch page
    assert np.count_nonzero(pages) == 4
    assert np.asarray(cache.v_pages[1, 0, 3, 0, 0]) == -1
    assert not np.asarray(cache.k_pages[0]).any()  # other layers untouched


def test_positions_beyond_the_table_go_to_the_scratch_page(tiny_cfg):
    cache = PagedKVCache.init(tiny_cfg, num_pages=4, page_size=4, batch=1, pages_per_seq=2)
    cache = PagedKVCache(cache.k_pages, cache.v_pages, jnp.array([[1, 2]], jnp.int32))
    page, offset = cache.slots(jnp.array([[0, 7, 8, 100, -1]], jnp.int32))
    assert page.tolist() == [[1, 2, 0, 0, 0]]
    assert offset.tolist() == [[0, 3, 0, 0, 0]]


def test_gather_pages_lays_out_each_rows_positions_in_order():
    pages = jnp.arange(5 * 2, dtype=jnp.float32).reshape(1, 5, 2, 1)  # value = 2*page + offset
    dense = reference.gather_pages(pages, jnp.array([[4, 1, 0], [2, 3, 0]], jnp.int32))
    assert dense[:, 0, :4, 0].tolist() == [[8, 9, 2, 3], [4, 5, 6, 7]]


def test_init_rejects_a_pool_without_room_beside_the_scratch_page(tiny_cfg):
    with pytest.raises(ValueError, match="num_pages=1"):
        PagedKVCache.init(tiny_cfg, num_pages=1, page_size=4, batch=1, pages_per_seq=1)
