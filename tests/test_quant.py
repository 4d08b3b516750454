"""Quantized arrays: quantize/dequantize, products against dequantize-then-multiply, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import quant

# (einsum spec, x shape, w shape, contraction axis of w): the model's products.
PRODUCTS = [
    ("btd,dhk->bthk", (1, 1, 64), (64, 4, 16), -3),  # q/k/v projections, decode
    ("btd,dhk->bthk", (2, 5, 64), (64, 4, 16), -3),  # prefill
    ("bthk,hkd->btd", (1, 1, 4, 32), (4, 32, 48), -2),  # output projection
    ("btf,fd->btd", (3, 1, 96), (96, 64), -2),  # mlp down
    ("...d,vd->...v", (2, 64), (80, 64), -1),  # unembedding
    ("...d,vd->...v", (8, 64), (80, 64), -1),
]


def _weights(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05


@pytest.mark.parametrize("precision,group", [("int8", None), ("int8", 32), ("int4", 32),
                                             ("int4", 64)])
def test_round_trip_error_is_within_half_a_step(precision, group):
    w = _weights((48, 128))
    q = quant.quantize(w, precision, axis=-1, group=group)
    back = np.asarray(quant.dequantize(q))
    step = np.repeat(np.asarray(q.scales), q.group, axis=-1)
    assert back.shape == w.shape and q.shape == w.shape
    assert np.all(np.abs(back - w) <= step / 2 + 1e-7)


def test_int4_packs_two_values_per_byte():
    q = quant.quantize(_weights((16, 128)), "int4", axis=-1, group=64)
    assert q.values.dtype == np.uint8 and q.values.shape == (16, 64)
    assert q.scales.shape == (16, 2) and q.zeros.shape == (16, 2)


def test_contraction_axis_is_stored_last():
    w = _weights((64, 4, 16))
    q = quant.quantize(w, "int8", axis=-3)
    assert q.values.shape == (4, 16, 64) and q.shape == (64, 4, 16)
    np.testing.assert_allclose(quant.dequantize(q), w, atol=float(np.max(q.scales)))


@pytest.mark.numerics
def test_numpy_and_jax_quantize_agree():
    w = _weights((32, 64))
    for precision in ("int8", "int4"):
        a, b = quant.quantize(w, precision), quant.quantize(jnp.asarray(w), precision)
        np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
        np.testing.assert_allclose(np.asarray(a.scales), np.asarray(b.scales), rtol=1e-6)


@pytest.mark.numerics
@pytest.mark.parametrize("spec,x_shape,w_shape,axis", PRODUCTS)
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_product_equals_dequantize_then_multiply(spec, x_shape, w_shape, axis,
                                                           precision):
    x = jnp.asarray(_weights(x_shape, 1) * 20)
    q = quant.quantize(_weights(w_shape), precision, axis=axis)
    expected = jnp.einsum(spec, x, quant.dequantize(q), precision="highest")
    got = jax.jit(lambda x, q: quant.einsum(spec, x, q))(x, q)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_float_weights_pass_through():
    x, w = jnp.ones((2, 8)), jnp.asarray(_weights((8, 3)))
    np.testing.assert_allclose(quant.einsum("bd,dn->bn", x, w), x @ w, rtol=1e-6)


def test_decode_product_never_materialises_a_float_weight():
    """The int8 -> float conversion is fused into the reduction: no f32 [out, in] buffer."""
    q = quant.quantize(_weights((256, 384)), "int8", axis=-2)
    x = jnp.ones((1, 256))
    hlo = jax.jit(lambda x, q: quant.einsum("bd,dn->bn", x, q)).lower(x, q).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    assert "f32[384,256]" not in entry and "f32[256,384]" not in entry
    assert "s8[384,256]" in entry  # the int8 weight goes straight into the fusion


def test_embedding_lookup_dequantizes_only_the_rows():
    table = _weights((100, 32))
    q = quant.quantize(table, "int8")
    ids = jnp.asarray([[3, 99, 0]])
    np.testing.assert_allclose(quant.take(q, ids, jnp.float32),
                               np.asarray(quant.dequantize(q))[[[3, 99, 0]]], rtol=1e-6)


def test_leading_axis_indexing_keeps_the_contraction_axis():
    q = quant.quantize(_weights((3, 64, 32)), "int4", axis=-2)
    layer = q[1]
    assert layer.shape == (64, 32)
    np.testing.assert_allclose(quant.dequantize(layer), np.asarray(quant.dequantize(q))[1])


@pytest.mark.parametrize("kwargs,message", [
    ({"precision": "int3"}, "allowed: int8, int4"),
    ({"precision": "int4", "group": 48}, "group size 48; allowed: 32, 64, 128"),
    ({"precision": "int4", "group": 128}, "group size 128 does not divide the quantized "
                                          "dimension 96"),
])
def test_bad_quantization_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quant.quantize(_weights((4, 96)), axis=-1, **kwargs)


def test_contraction_axis_must_be_negative():
    with pytest.raises(ValueError, match="negative"):
        quant.quantize(_weights((4, 96)), axis=1)
