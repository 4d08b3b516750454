"""The CPU decode-attention kernel (jaxinfer.kernels.cpu.attention) against the plain-jnp
references on every instruction-set path this machine runs, over dense and paged caches in
fp32, bf16 and int8; a row's output bitwise independent of its batch, of its row's number of
queries and of the cache length allocated; and the model's choice of it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import pallas
from jaxinfer.cache import KVCache, quantize_kv
from jaxinfer.kernels import cpu
from jaxinfer.models import llama
from jaxinfer.pallas import blocked, reference

pytestmark = pytest.mark.skipif(not cpu.available(), reason="CPU kernels not built or off")

ISAS = cpu.available_isas()
# fp32: the kernel sums each dot in 16 lanes and its softmax in one pass over the keys, the
# references in XLA's orders; bf16: the output's own rounding.
ATOL = {jnp.float32: 2e-6, jnp.bfloat16: 2e-2, jnp.int8: 2e-6}


def cache_values(rng, shape, dtype):
    """k, v of `shape` [..., head_dim] and their scales (int8: quantized per token)."""
    k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    if dtype == jnp.int8:
        (kq, ks), (vq, vs) = quantize_kv(jnp.asarray(k)), quantize_kv(jnp.asarray(v))
        return kq, vq, (ks, vs)
    return jnp.asarray(k, dtype), jnp.asarray(v, dtype), None


def options_for(case: int, rng, heads: int, batch: int, max_len: int) -> dict:
    """Every option alone, then all together."""
    window = dict(window=[17, jnp.int32(40)][case % 2])
    softcap = dict(softcap=20.0)
    lengths = dict(kv_lengths=jnp.asarray(rng.integers(0, max_len + 1, batch), jnp.int32))
    sinks = dict(sinks=jnp.asarray(rng.standard_normal(heads), jnp.float32))
    return [{}, window, softcap, lengths, sinks, {**window, **softcap, **lengths, **sinks}][case]


def want_dense(q, k, v, positions, scales, **options):
    """The reference: reference.attention, or blocked XLA where only it has the option
    (sinks) or the cache format (int8)."""
    if scales is None and "sinks" not in options:
        return reference.attention(q, k, v, positions, **options)
    return blocked.attention(q, k, v, positions, scales=scales, **options)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int8])
@pytest.mark.parametrize("case", range(6))
def test_dense_kernel_matches_the_reference(isa, dtype, case):
    rng = np.random.default_rng([case, ISAS.index(isa)])
    batch, heads, kv_heads = int(rng.integers(1, 6)), 8, [1, 2, 4, 8][case % 4]
    head_dim, max_len, seq = [16, 40, 64, 24][case % 4], int(rng.integers(20, 300)), 1 + case
    k, v, scales = cache_values(rng, (3, batch, kv_heads, max_len, head_dim), dtype)
    q_dtype = jnp.bfloat16 if dtype == jnp.bfloat16 else jnp.float32
    q = jnp.asarray(rng.standard_normal((batch, seq, heads, head_dim)), q_dtype)
    positions = jnp.asarray(rng.integers(-1, max_len + 5, (batch, seq)), jnp.int32)
    options = options_for(case, rng, heads, batch, max_len)
    got = jax.jit(lambda q, p: cpu.attention(q, k, v, p, layer=jnp.int32(2), scales=scales,
                                             isa=isa, **options))(q, positions)
    layer_scales = None if scales is None else (scales[0][2], scales[1][2])
    want = want_dense(q, k[2], v[2], positions, layer_scales, **options)
    assert got.dtype == want.dtype == q_dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int8])
@pytest.mark.parametrize("page_size,seq", [(16, 1), (48, 4), (8, 16)])
def test_paged_kernel_matches_the_reference(isa, dtype, page_size, seq):
    rng = np.random.default_rng([page_size, seq])
    batch, heads, kv_heads, head_dim, pages_per_seq = 3, 6, 2, 32, -(-200 // page_size)
    num_pages = 1 + batch * pages_per_seq
    k, v, scales = cache_values(rng, (2, kv_heads, num_pages, page_size, head_dim), dtype)
    table = jnp.asarray(rng.permutation(np.arange(1, num_pages)).reshape(batch, -1), jnp.int32)
    positions = jnp.asarray(rng.integers(-1, pages_per_seq * page_size, (batch, seq)), jnp.int32)
    q = jnp.asarray(rng.standard_normal((batch, seq, heads, head_dim)), jnp.float32)
    got = cpu.attention(q, k, v, positions, layer=1, scales=scales, page_table=table,
                        window=100, isa=isa)
    if scales is None:
        want = reference.paged_attention(q, k[1], v[1], table, positions, window=100)
    else:
        want = blocked.paged_attention(q, k, v, table, positions, layer=1, scales=scales,
                                       window=100)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL[dtype], rtol=0)


def test_a_row_gets_the_same_bits_whatever_its_batch_queries_and_cache_length():
    """Row 0's queries at positions 90..93: alone with one query at a time, alone with all
    four, and among 31 random rows with four queries each in a cache 3x as long."""
    rng = np.random.default_rng(7)
    heads, kv_heads, head_dim = 9, 3, 64
    k, v, _ = cache_values(rng, (2, 32, kv_heads, 600, head_dim), jnp.float32)
    q = jnp.asarray(rng.standard_normal((32, 4, heads, head_dim)), jnp.float32)
    positions = np.asarray(rng.integers(0, 600, (32, 4)), np.int32)
    positions[0] = np.arange(90, 94)
    attend = jax.jit(lambda q, k, v, p: cpu.attention(q, k, v, p, layer=1))
    among = np.asarray(attend(q, k, v, jnp.asarray(positions)))[0]
    short_k, short_v = k[:, :1, :, :200], v[:, :1, :, :200]
    alone = np.asarray(attend(q[:1], short_k, short_v, jnp.asarray(positions[:1])))[0]
    one_by_one = [np.asarray(attend(q[:1, t:t + 1], short_k, short_v,
                                    jnp.asarray(positions[:1, t:t + 1])))[0, 0]
                  for t in range(4)]
    np.testing.assert_array_equal(among, alone)
    np.testing.assert_array_equal(among, np.stack(one_by_one))


def test_bad_input_gets_a_clear_error():
    q = jnp.zeros((2, cpu.MAX_QUERIES + 1, 4, 16), jnp.float32)
    k = jnp.zeros((2, 2, 32, 16), jnp.float32)
    with pytest.raises(ValueError, match=f"up to {cpu.MAX_QUERIES} queries"):
        cpu.attention(q, k, k, jnp.zeros((2, cpu.MAX_QUERIES + 1), jnp.int32))
    with pytest.raises(ValueError, match="needs its scales"):
        cpu.attention(q[:, :1], k.astype(jnp.int8), k.astype(jnp.int8),
                      jnp.zeros((2, 1), jnp.int32))
    with pytest.raises(ValueError, match="does not fit"):
        cpu.attention(q[:, :1, :3], k, k, jnp.zeros((2, 1), jnp.int32))


def _custom_calls(fn, *args) -> str:
    return " ".join(line for line in jax.jit(fn).lower(*args).as_text().splitlines()
                    if "custom_call" in line)


def test_auto_attention_takes_the_kernel_for_decode_and_xla_for_prefill():
    rng = np.random.default_rng(2)
    k, v, _ = cache_values(rng, (2, 2, 2, 64, 16), jnp.float32)
    attend = {impl: lambda q, p, impl=impl: pallas.attention(q, k, v, p, layer=0, impl=impl)
              for impl in ("auto", "xla")}
    for seq, kernel in ((1, True), (cpu.MAX_QUERIES, True), (cpu.MAX_QUERIES + 1, False)):
        q, p = jnp.zeros((2, seq, 4, 16), jnp.float32), jnp.zeros((2, seq), jnp.int32)
        assert ("jaxinfer_attention" in _custom_calls(attend["auto"], q, p)) == kernel
        assert "jaxinfer_attention" not in _custom_calls(attend["xla"], q, p)


def test_attention_cpu_falls_back_to_xla_where_the_kernels_are_off():
    assert pallas.resolve("cpu") == "cpu"
    cpu.set_enabled(False)
    try:
        assert pallas.resolve("cpu") == pallas.resolve("auto") == "xla"
    finally:
        cpu.set_enabled(True)


def test_a_model_with_cpu_kernels_off_keeps_attention_on_xla(tiny_cfg, tiny_params):
    cache = KVCache.init(tiny_cfg, 1, 32)
    tokens, positions = jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32)
    for mode, kernel in (("int8", True), ("off", False)):
        mode_cfg = dataclasses.replace(tiny_cfg, cpu_kernels=mode)
        step = lambda t, p, c, cfg=mode_cfg: llama.forward(  # noqa: E731
            tiny_params, t, p, c, cfg)
        assert ("jaxinfer_attention" in _custom_calls(step, tokens, positions, cache)) == kernel
