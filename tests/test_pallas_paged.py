"""The paged decode kernel, interpreted on CPU, against the jnp reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.cache import KVCache, PagedKVCache
from jaxinfer.models import family
from jaxinfer.pallas import reference
from jaxinfer.pallas.paged_attention import paged_attention
from tests.numerics import assert_top1_agrees_where_decisive

# Max |kernel - reference| on unit-normal inputs; why bf16 differs: see test_pallas_flash.
ATOL = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}
GARBAGE = 1e3  # the scratch page and unallocated pages hold this: any leak shows


@dataclasses.dataclass(frozen=True)
class Case:
    platform: str
    dtype: type
    seq: int  # new tokens per row: 1 (decode) or a few (speculative)
    heads: int
    kv_heads: int
    lengths: tuple[int, ...]  # each row's length after its new tokens (mixed, ragged)
    page_size: int = 8
    block_kv: int = 16
    head_dim: int = 64
    window: int | None = None
    softcap: float | None = None


CASES = [
    # GQA 3, two pages per block, a length-1 row, a row ending exactly on a page boundary
    Case("gpu", jnp.float32, seq=1, heads=6, kv_heads=2, lengths=(1, 37, 16, 20)),
    Case("tpu", jnp.float32, seq=1, heads=6, kv_heads=2, lengths=(1, 37, 16, 20), window=5),
    # three tokens per row, GQA 8, window longer than any row, soft-capping, bf16
    Case("gpu", jnp.bfloat16, seq=3, heads=8, kv_heads=1, lengths=(40, 3, 29), window=64,
         softcap=20.0, page_size=16, block_kv=32),
    Case("tpu", jnp.bfloat16, seq=3, heads=8, kv_heads=1, lengths=(40, 3, 29), window=9,
         page_size=16, block_kv=32),
    # multi-head (GQA 1), head_dim 128, one page per block
    Case("gpu", jnp.float32, seq=2, heads=2, kv_heads=2, lengths=(18, 5), head_dim=128,
         page_size=16, block_kv=16, window=6),
]


def make_inputs(case: Case, seed: int, n_layers: int = 2):
    """A page pool with each row's pages shuffled through it; unallocated table entries are
    0 (scratch). Queries sit at each row's last `seq` positions."""
    rng = np.random.default_rng(seed)
    batch, ps = len(case.lengths), case.page_size
    pages_per_seq = -(-max(case.lengths) // ps) + 1  # one spare entry: stays scratch
    needed = [-(-n // ps) for n in case.lengths]
    num_pages = 1 + sum(needed) + 2  # two never-allocated pages too
    shape = (n_layers, case.kv_heads, num_pages, ps, case.head_dim)
    k_pages = np.full(shape, GARBAGE, np.float32)
    v_pages = np.full(shape, GARBAGE, np.float32)
    table = np.zeros((batch, pages_per_seq), np.int32)
    free = list(rng.permutation(np.arange(1, num_pages)))
    for row, n in enumerate(needed):
        for i in range(n):
            page = table[row, i] = free.pop()
            k_pages[:, :, page] = rng.standard_normal(shape[:2] + shape[3:])
            v_pages[:, :, page] = rng.standard_normal(shape[:2] + shape[3:])
    lengths = np.array(case.lengths)
    positions = lengths[:, None] - case.seq + np.arange(case.seq)[None, :]
    positions = np.maximum(positions, 0)  # a row shorter than seq repeats position 0
    q = rng.standard_normal((batch, case.seq, case.heads, case.head_dim))
    as_dtype = lambda x: jnp.asarray(x, case.dtype)  # noqa: E731
    return (as_dtype(q), as_dtype(k_pages), as_dtype(v_pages), jnp.asarray(table),
            jnp.asarray(positions, jnp.int32))


@pytest.mark.numerics
@pytest.mark.parametrize("case", CASES, ids=lambda c: (
    f"{c.platform}-{jnp.dtype(c.dtype).name}-seq{c.seq}-gqa{c.heads // c.kv_heads}"
    f"-page{c.page_size}-block{c.block_kv}-w{c.window}"))
def test_kernel_matches_reference(case):
    q, k_pages, v_pages, table, positions = make_inputs(case, seed=case.seq + case.heads)

    @jax.jit  # layer and window are arguments: traced, as the model's scan gives them
    def kernel(q, k_pages, v_pages, table, positions, layer, window):
        return paged_attention(q, k_pages, v_pages, table, positions, layer=layer,
                               window=window, softcap=case.softcap, block_kv=case.block_kv,
                               platform=case.platform, interpret=True)

    layer = 1
    got = kernel(q, k_pages, v_pages, table, positions, layer, case.window)
    want = reference.paged_attention(q, k_pages[layer], v_pages[layer], table, positions,
                                     window=case.window, softcap=case.softcap)
    assert got.dtype == want.dtype and got.shape == want.shape
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()
    assert np.abs(want).max() < 10  # the reference saw no garbage either
    np.testing.assert_allclose(got, want, atol=ATOL[case.dtype], rtol=0)


def _inputs(heads=4, kv_heads=2, head_dim=64, page_size=8):
    q = jnp.zeros((2, 1, heads, head_dim))
    pages = jnp.zeros((kv_heads, 5, page_size, head_dim))
    return q, pages, pages, jnp.zeros((2, 2), jnp.int32), jnp.zeros((2, 1), jnp.int32)


def test_page_size_not_dividing_the_block_is_a_clear_error():
    with pytest.raises(ValueError, match="page_size=8 does not divide block_kv=20"):
        paged_attention(*_inputs(), block_kv=20, interpret=True)


def test_unsupported_head_dim_is_a_clear_error():
    with pytest.raises(ValueError, match="head_dim=80 is not supported"):
        paged_attention(*_inputs(head_dim=80), interpret=True)


def test_heads_not_a_multiple_of_kv_heads_is_a_clear_error():
    with pytest.raises(ValueError, match="n_heads=5 is not a multiple of n_kv_heads=2"):
        paged_attention(*_inputs(heads=5), interpret=True)


def test_pallas_on_an_unsupported_model_fails_at_trace_time(tiny_cfg, tiny_params):
    cfg = dataclasses.replace(tiny_cfg, attention="pallas")  # head_dim 16
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="head_dim=16 is not supported"):
        family(cfg.architecture).forward(tiny_params, tokens, jnp.arange(4)[None],
                                         KVCache.init(cfg, 1, 8), cfg)


@pytest.mark.numerics
def test_smollm2_decodes_through_the_paged_kernel_like_the_dense_xla_path(smollm2):
    """Real model, paged cache, attention=pallas (prefill: gathered pages through the flash
    kernel; decode: the paged kernel) against the dense cache with attention=xla: logits
    within 1e-5 of their range (measured 1.6e-6), the same greedy tokens wherever the XLA
    path's are decisive (top-2 margin over twice that)."""
    cfg, params, tokenizer = smollm2
    forward = jax.jit(family(cfg.architecture).forward, static_argnames="cfg")
    kernel_cfg = dataclasses.replace(cfg, attention="pallas")
    xla_cfg = dataclasses.replace(cfg, attention="xla")
    # The longer prompt (> DECODE_MAX_TOKENS) sends prefill through the gather + flash path.
    texts = ("In 1969, Neil Armstrong became the first person to", "Hello")
    prompts = [tokenizer.encode(t) for t in texts]
    assert max(map(len, prompts)) > PagedKVCache.DECODE_MAX_TOKENS
    batch, seq = len(prompts), max(map(len, prompts))
    lengths = np.array([len(p) for p in prompts])
    tokens = np.zeros((batch, seq), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    page_size, pages_per_seq = 16, 2
    paged = PagedKVCache.init(cfg, 1 + batch * pages_per_seq, page_size, batch, pages_per_seq)
    paged = dataclasses.replace(paged, page_table=jnp.array([[3, 1], [4, 2]], jnp.int32))
    dense = KVCache.init(cfg, batch, page_size * pages_per_seq)
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    want, dense = forward(params, tokens, positions, dense, xla_cfg)
    got, paged = forward(params, tokens, positions, paged, kernel_cfg)
    valid = np.arange(seq)[None] < lengths[:, None]
    diffs = [np.abs(np.asarray(got - want))[valid].max() / np.ptp(np.asarray(want)[valid])]
    next_tokens = np.asarray(want)[np.arange(batch), lengths - 1].argmax(-1)
    for step in range(2):  # greedy decode: both paths must pick the same tokens
        positions = jnp.asarray(lengths + step)[:, None]
        want, dense = forward(params, next_tokens[:, None], positions, dense, xla_cfg)
        got, paged = forward(params, next_tokens[:, None], positions, paged, kernel_cfg)
        diffs.append(float(np.abs(np.asarray(got - want)).max() / np.ptp(np.asarray(want))))
        assert_top1_agrees_where_decisive(got, want, 1e-5 * float(np.ptp(np.asarray(want))))
        next_tokens = np.asarray(want)[:, 0].argmax(-1)
    print(f"max |logits diff| / range per step: {', '.join(f'{d:.1e}' for d in diffs)}")
    assert max(diffs) <= 1e-5


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_kernel_lowers_for_the_device(platform):
    from test_pallas_flash import lower_for

    shape = jax.ShapeDtypeStruct
    q = shape((3, 1, 8, 128), jnp.bfloat16)
    pages = shape((4, 2, 40, 16, 128), jnp.bfloat16)  # layers, kv_heads, pages, page, d
    table, positions = shape((3, 7), jnp.int32), shape((3, 1), jnp.int32)
    scalar = shape((), jnp.int32)
    module = lower_for(platform, lambda q, k, v, t, p, layer, w: paged_attention(
        q, k, v, t, p, layer=layer, window=w, softcap=30.0, platform=platform),
        q, pages, pages, table, positions, scalar, scalar)
    assert ("xla.gpu.triton" if platform == "gpu" else "tpu_custom_call") in module


@pytest.mark.numerics
@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_random_lengths_windows_and_page_tables(platform):
    """One compiled shape, many draws of what varies at run time: each row's length (1 up to
    the table's capacity), a shuffled page table, the window and the layer."""
    rng = np.random.default_rng(7)
    batch, seq, heads, kv_heads, head_dim, page_size, pages_per_seq = 4, 2, 6, 2, 64, 8, 4
    num_pages = 1 + batch * pages_per_seq
    shape = (2, kv_heads, num_pages, page_size, head_dim)
    k_pages = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    v_pages = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jax.jit(lambda q, table, positions, layer, window: paged_attention(
        q, k_pages, v_pages, table, positions, layer=layer, window=window, block_kv=16,
        platform=platform, interpret=True))
    for _ in range(12):
        lengths = rng.integers(1, pages_per_seq * page_size + 1, batch)
        table = np.zeros((batch, pages_per_seq), np.int32)
        free = list(rng.permutation(np.arange(1, num_pages)))
        for row, length in enumerate(lengths):
            needed = -(-length // page_size)
            table[row, :needed] = [free.pop() for _ in range(needed)]
        positions = np.maximum(lengths[:, None] - seq + np.arange(seq), 0).astype(np.int32)
        q = jnp.asarray(rng.standard_normal((batch, seq, heads, head_dim)), jnp.float32)
        layer, window = int(rng.integers(0, 2)), int(rng.integers(1, 40))
        got = kernel(q, table, positions, layer, window)
        want = reference.paged_attention(q, k_pages[layer], v_pages[layer], jnp.asarray(table),
                                         jnp.asarray(positions), window=window)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL[jnp.float32],
                                   rtol=0, err_msg=f"lengths {lengths}, window {window}")
