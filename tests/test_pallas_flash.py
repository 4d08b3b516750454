"""The flash-attention (prefill) kernel, interpreted on CPU, against the jnp reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer import pallas
from jaxinfer.kernels import cpu
from jaxinfer.pallas import reference
from jaxinfer.pallas.flash_attention import flash_attention
from tests.numerics import assert_greedy_agrees_until_a_near_tie, assert_top1_agrees_where_decisive

# Max |kernel - reference| on unit-normal inputs. fp32: only summation order differs. bf16:
# both round the softmax weights to bf16 before the PV product, at different scales (the
# kernel before normalising), so they differ by a few bf16 ulps of the output.
ATOL = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    platform: str
    dtype: type
    seq: int  # query tokens per row (a prefill chunk)
    heads: int
    kv_heads: int
    head_dim: int = 64
    kv_len: int = 40
    window: int | None = None
    softcap: float | None = None
    empty_row: bool = False  # one row with kv length 0: no visible key, zeros out
    block_q: int = 16
    block_kv: int = 16


CASES = [
    # chunk not a multiple of the blocks, GQA 3, mixed starts and lengths
    Case("gpu", jnp.float32, seq=21, heads=6, kv_heads=2),
    Case("tpu", jnp.float32, seq=21, heads=6, kv_heads=2, window=7, softcap=5.0),
    # length 1, GQA 8, a window longer than the sequence
    Case("gpu", jnp.bfloat16, seq=1, heads=8, kv_heads=1, kv_len=33, window=100),
    Case("tpu", jnp.bfloat16, seq=1, heads=8, kv_heads=1, kv_len=33, window=100, empty_row=True),
    # GQA 1 (multi-head), head_dim 128, a short window, bigger blocks
    Case("gpu", jnp.bfloat16, seq=19, heads=2, kv_heads=2, head_dim=128, window=5, softcap=30.0,
         block_q=32, block_kv=32),
    Case("tpu", jnp.float32, seq=19, heads=2, kv_heads=2, head_dim=128, window=5, empty_row=True),
    Case("gpu", jnp.float32, seq=5, heads=4, kv_heads=2, head_dim=256, kv_len=24, window=3,
         empty_row=True),
]


def make_inputs(case: Case, seed: int):
    """Three rows at different offsets into their sequences (chunked prefill), each with its
    own kv length; the rest of the cache is garbage that must stay invisible."""
    rng = np.random.default_rng(seed)
    batch = 3
    q = rng.standard_normal((batch, case.seq, case.heads, case.head_dim))
    k = rng.standard_normal((batch, case.kv_heads, case.kv_len, case.head_dim))
    v = rng.standard_normal((batch, case.kv_heads, case.kv_len, case.head_dim))
    starts = rng.integers(0, case.kv_len - case.seq + 1, batch)
    positions = starts[:, None] + np.arange(case.seq)[None, :]
    kv_lengths = starts + case.seq
    if case.empty_row:
        kv_lengths[1] = 0
    as_dtype = lambda x: jnp.asarray(x, case.dtype)  # noqa: E731
    return (as_dtype(q), as_dtype(k), as_dtype(v), jnp.asarray(positions, jnp.int32),
            jnp.asarray(kv_lengths, jnp.int32))


@pytest.mark.numerics
@pytest.mark.parametrize("case", CASES, ids=lambda c: (
    f"{c.platform}-{jnp.dtype(c.dtype).name}-seq{c.seq}-gqa{c.heads // c.kv_heads}"
    f"-d{c.head_dim}-w{c.window}"))
def test_kernel_matches_reference(case):
    q, k, v, positions, kv_lengths = make_inputs(case, seed=len(CASES) + case.seq)

    @jax.jit  # the window is an argument, so the kernel sees it traced, as the model gives it
    def kernel(q, k, v, positions, kv_lengths, window):
        return flash_attention(q, k, v, positions, window=window, softcap=case.softcap,
                               kv_lengths=kv_lengths, block_q=case.block_q,
                               block_kv=case.block_kv, platform=case.platform, interpret=True)

    got = kernel(q, k, v, positions, kv_lengths, case.window)
    want = reference.attention(q, k, v, positions, window=case.window, softcap=case.softcap,
                               kv_lengths=kv_lengths)
    assert got.dtype == want.dtype and got.shape == want.shape
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=ATOL[case.dtype], rtol=0)
    if case.empty_row:
        assert not got[1].any()


def _inputs(heads=4, kv_heads=2, head_dim=64):
    q = jnp.zeros((1, 4, heads, head_dim))
    k = jnp.zeros((1, kv_heads, 16, head_dim))
    return q, k, k, jnp.zeros((1, 4), jnp.int32)


def test_unsupported_head_dim_is_a_clear_error():
    with pytest.raises(ValueError, match=r"head_dim=48 is not supported.*64, 128, 256"):
        flash_attention(*_inputs(head_dim=48), interpret=True)


def test_heads_not_a_multiple_of_kv_heads_is_a_clear_error():
    with pytest.raises(ValueError, match="n_heads=6 is not a multiple of n_kv_heads=4"):
        flash_attention(*_inputs(heads=6, kv_heads=4), interpret=True)


def test_block_size_not_a_power_of_two_is_a_clear_error():
    with pytest.raises(ValueError, match="block_kv=24; it must be a power of two >= 16"):
        flash_attention(*_inputs(), block_kv=24, interpret=True)


def test_auto_picks_the_cpu_kernel_or_xla_on_cpu():
    assert jax.default_backend() == "cpu"
    assert pallas.resolve("auto", 64) == ("cpu" if cpu.available() else "xla")
    assert pallas.resolve("pallas", 64) == "pallas"
    with pytest.raises(ValueError, match="attention='triton'; allowed: auto, xla, pallas, cpu"):
        pallas.resolve("triton")


def test_config_rejects_an_unknown_attention(tiny_cfg):
    with pytest.raises(ValueError, match="attention='flash'"):
        dataclasses.replace(tiny_cfg, attention="flash")


@pytest.mark.numerics
def test_smollm2_greedy_tokens_and_logits_match_xla(smollm2):
    """The acceptance check: the real model (head_dim 64, GQA 3) through the interpreted
    kernels gives the XLA path's logits within 1e-5 of their range (measured 7.8e-7), and its
    greedy tokens up to a near-tie (top-2 margin under twice that; measured: none)."""
    cfg, params, tokenizer = smollm2
    ids = tokenizer.encode("The capital of France is")
    kernel_cfg = dataclasses.replace(cfg, attention="pallas")
    want = jaxinfer.generate(params, [ids], dataclasses.replace(cfg, attention="xla"),
                             max_new_tokens=4)
    got = jaxinfer.generate(params, [ids], kernel_cfg, max_new_tokens=4)

    from jaxinfer.cache import KVCache
    from jaxinfer.models import family

    tokens = jnp.asarray([ids + want.tokens[0][:-1]])
    positions = jnp.arange(tokens.shape[1])[None]
    forward = family(cfg.architecture).forward
    cache = KVCache.init(cfg, 1, 16)
    logits_xla, _ = forward(params, tokens, positions, cache, cfg)
    logits_pallas, _ = forward(params, tokens, positions, cache, kernel_cfg)
    scale = float(jnp.ptp(logits_xla))
    max_diff = float(jnp.abs(logits_pallas - logits_xla).max())
    print(f"max |logits diff| {max_diff:.2e} over a range of {scale:.1f}")
    assert max_diff <= 1e-5 * scale
    assert_top1_agrees_where_decisive(logits_pallas, logits_xla, 1e-5 * scale)
    assert_greedy_agrees_until_a_near_tie(got.tokens[0], want.tokens[0],
                                          logits_xla[0, len(ids) - 1:], 1e-5 * scale)


def lower_for(platform: str, fn, *args) -> str:
    """StableHLO of `fn` lowered for a GPU or TPU from this CPU machine: runs the Pallas ->
    Triton / Mosaic lowering of the kernels (not the device compilers behind them)."""
    from jax import export

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),
              export.DisabledSafetyCheck.custom_call("tpu_custom_call")]
    target = {"gpu": "cuda", "tpu": "tpu"}[platform]
    return export.export(jax.jit(fn), platforms=[target], disabled_checks=checks)(*args)\
        .mlir_module()


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_kernel_lowers_for_the_device(platform):
    shape = jax.ShapeDtypeStruct
    q = shape((2, 100, 8, 128), jnp.bfloat16)
    k = shape((2, 2, 300, 128), jnp.bfloat16)
    positions, window = shape((2, 100), jnp.int32), shape((), jnp.int32)
    module = lower_for(platform, lambda q, k, v, p, w: flash_attention(
        q, k, v, p, window=w, softcap=30.0, platform=platform), q, k, k, positions, window)
    assert ("xla.gpu.triton" if platform == "gpu" else "tpu_custom_call") in module


@pytest.mark.numerics
@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_random_offsets_lengths_and_windows(platform):
    """One compiled shape, many draws of what varies at run time: each row's chunk offset and
    kv length (0 included), and the window."""
    rng = np.random.default_rng(11)
    batch, seq, heads, kv_heads, head_dim, kv_len = 3, 9, 4, 1, 64, 48
    k = jnp.asarray(rng.standard_normal((batch, kv_heads, kv_len, head_dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((batch, kv_heads, kv_len, head_dim)), jnp.float32)
    kernel = jax.jit(lambda q, positions, kv_lengths, window: flash_attention(
        q, k, v, positions, window=window, kv_lengths=kv_lengths, block_q=16, block_kv=16,
        platform=platform, interpret=True))
    for _ in range(12):
        starts = rng.integers(0, kv_len - seq + 1, batch)
        positions = (starts[:, None] + np.arange(seq)).astype(np.int32)
        kv_lengths = np.minimum(starts + seq + rng.integers(-seq, 3, batch), kv_len)
        kv_lengths = np.maximum(kv_lengths, 0).astype(np.int32)
        window = int(rng.integers(1, 60))
        q = jnp.asarray(rng.standard_normal((batch, seq, heads, head_dim)), jnp.float32)
        got = kernel(q, positions, kv_lengths, window)
        want = reference.attention(q, k, v, jnp.asarray(positions), window=window,
                                   kv_lengths=jnp.asarray(kv_lengths))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL[jnp.float32],
                                   rtol=0, err_msg=f"starts {starts}, lengths {kv_lengths}")
