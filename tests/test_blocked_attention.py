"""The CPU attention path (pallas/blocked.py) against the full-cache reference: same results,
the same bits for a row whatever shares its batch, and no work on the cache past the rows."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import pallas
from jaxinfer.pallas import blocked, reference

HEADS, KV_HEADS, HEAD_DIM = 6, 2, 32
ATOL = {jnp.float32: 2e-6, jnp.bfloat16: 2e-2}


def dense_cache(rng, batch: int, max_len: int, dtype, layers: int = 3):
    shape = (layers, batch, KV_HEADS, max_len, HEAD_DIM)
    return (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))


def queries(rng, batch: int, seq: int, dtype) -> jax.Array:
    return jnp.asarray(rng.standard_normal((batch, seq, HEADS, HEAD_DIM)), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("seq,max_len", [(1, 700), (3, 300), (1, 40), (300, 640)])
def test_dense_blocked_attention_matches_the_reference(dtype, seq, max_len):
    rng = np.random.default_rng([seq, max_len])
    k, v = dense_cache(rng, 3, max_len, dtype)
    attend = jax.jit(lambda *a, **o: pallas.attention(*a, layer=1, impl="xla", **o))
    for case in range(3):
        starts = rng.integers(0, max_len - seq + 1, 3)
        positions = jnp.asarray(starts[:, None] + np.arange(seq), jnp.int32)
        options = dict(
            window=[None, 17, jnp.int32(200)][case % 3],
            softcap=30.0 if case % 2 else None,
            kv_lengths=jnp.asarray(np.minimum(starts + seq, max_len) - case % 2, jnp.int32),
        )
        q = queries(rng, 3, seq, dtype)
        got = attend(q, k, v, positions, **options)
        want = reference.attention(q, k[1], v[1], positions, **options)
        assert got.dtype == want.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=ATOL[dtype], rtol=0, err_msg=f"case {case}, {starts}")


@pytest.mark.parametrize("page_size,seq", [(16, 1), (48, 4), (512, 1), (16, 40)])
def test_paged_blocked_attention_matches_the_reference(page_size, seq):
    rng = np.random.default_rng([page_size, seq])
    batch, pages_per_seq = 3, -(-600 // page_size)
    num_pages = 1 + batch * pages_per_seq
    shape = (2, KV_HEADS, num_pages, page_size, HEAD_DIM)
    k_pages, v_pages = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
    table = jnp.asarray(rng.permutation(np.arange(1, num_pages)).reshape(batch, -1), jnp.int32)
    max_len = pages_per_seq * page_size
    starts = rng.integers(0, max_len - seq + 1, batch)
    positions = jnp.asarray(starts[:, None] + np.arange(seq), jnp.int32)
    q = queries(rng, batch, seq, jnp.float32)
    got = jax.jit(lambda *a: pallas.paged_attention(*a, layer=1, window=100, impl="xla"))(
        q, k_pages, v_pages, table, positions)
    want = reference.paged_attention(q, k_pages[1], v_pages[1], table, positions, window=100)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL[jnp.float32], rtol=0)


def test_a_query_that_sees_nothing_gets_zeros():
    rng = np.random.default_rng(3)
    k, v = dense_cache(rng, 2, 300, jnp.float32)
    positions = jnp.asarray([[-1], [260]], jnp.int32)
    got = blocked.attention(queries(rng, 2, 1, jnp.float32), k, v, positions, layer=0,
                            kv_lengths=jnp.asarray([300, 0], jnp.int32))
    np.testing.assert_array_equal(np.asarray(got), 0.0)


def test_a_decoding_row_gets_the_same_bits_whatever_the_other_rows_lengths_and_cache_length():
    """Row 0 at position 300 beside 7 rows at the same position in a 320-slot cache, then beside
    7 rows of other lengths (one far longer) in a 2,048-slot cache: bit-identical output."""
    rng = np.random.default_rng(11)
    q = queries(rng, 8, 1, jnp.float32)
    k, v = dense_cache(rng, 8, 2048, jnp.float32, layers=1)
    attend = jax.jit(lambda *a: pallas.attention(*a, layer=0, impl="xla", window=jnp.int32(1000)))
    short = attend(q, k[..., :320, :], v[..., :320, :], jnp.full((8, 1), 300, jnp.int32))
    positions = jnp.asarray([[300], [5], [2000], [0], [777], [1023], [256], [1]], jnp.int32)
    mixed = attend(q, k, v, positions)
    np.testing.assert_array_equal(np.asarray(mixed[0]), np.asarray(short[0]))


def _full_length_ops(hlo: str, max_len: int) -> list[str]:
    """Instructions of an optimized HLO module that compute (not just pass along) an array
    with a `max_len` dimension."""
    passing = ("parameter", "get-tuple-element", "tuple", "while", "bitcast", "copy-start",
               "copy-done")
    found = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = (\S+\[[\d,]*\])\S* (\S+?)\(", line)
        if m and str(max_len) in m.group(1).split("[")[1] and m.group(2) not in passing:
            found.append(line.strip()[:160])
    return found


def test_decode_attention_touches_only_blocks_not_the_allocated_cache():
    """The compiled decode program computes nothing cache-sized (the reference builds
    [..., max_len] scores), so its work follows the rows' lengths, not the allocation."""
    max_len = 4096
    q = jax.ShapeDtypeStruct((2, 1, HEADS, HEAD_DIM), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 2, KV_HEADS, max_len, HEAD_DIM), jnp.float32)
    positions = jax.ShapeDtypeStruct((2, 1), jnp.int32)

    def hlo(fn) -> str:
        return jax.jit(fn).lower(q, k, k, positions, jnp.int32(1)).compile().as_text()

    ours = hlo(lambda q, k, v, p, i: pallas.attention(q, k, v, p, layer=i, impl="xla"))
    assert _full_length_ops(ours, max_len) == []
    full = hlo(lambda q, k, v, p, i: reference.attention(q, k[i], v[i], p))
    assert _full_length_ops(full, max_len)  # the check sees what it is meant to catch


def test_an_int8_cache_is_dequantized_block_by_block_like_the_whole_layer():
    from jaxinfer.cache import dequantize_kv, quantize_kv

    rng = np.random.default_rng(5)
    k, v = dense_cache(rng, 2, 600, jnp.float32)
    (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
    positions = jnp.asarray([[599], [270]], jnp.int32)
    q = queries(rng, 2, 1, jnp.float32)
    got = pallas.attention(q, kq, vq, positions, layer=2, scales=(ks, vs), impl="xla")
    want = reference.attention(q, dequantize_kv(kq[2], ks[2], jnp.float32),
                               dequantize_kv(vq[2], vs[2], jnp.float32), positions)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL[jnp.float32], rtol=0)

    def pages(x):  # layer 2 as 8 pages of 150 positions: row b's page i is page 4 * b + i
        x = x[2].reshape(2, KV_HEADS, 4, 150, *x.shape[4:])
        return jnp.moveaxis(x, 1, 0).reshape(KV_HEADS, 8, 150, *x.shape[4:])

    table = jnp.asarray([[0, 1, 2, 3], [4, 5, 6, 7]], jnp.int32)
    got = pallas.paged_attention(q, pages(kq), pages(vq), table, positions,
                                 scales=(pages(ks), pages(vs)), impl="xla")
    want = reference.paged_attention(q, dequantize_kv(pages(kq), pages(ks), jnp.float32),
                                     dequantize_kv(pages(vq), pages(vs), jnp.float32), table,
                                     positions)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL[jnp.float32], rtol=0)
