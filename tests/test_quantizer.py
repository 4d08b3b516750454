"""The Quantizer: dynamic (weights only) and static (calibrated on activations)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import quant
from jaxinfer.models import llama
from jaxinfer.quant.calibrate import _broadcast_moments


@pytest.fixture(scope="module")
def cfg32(tiny_cfg):
    """The tiny model with head_dim 32, so int4 groups of 32 fit the output projection."""
    return dataclasses.replace(tiny_cfg, n_heads=2, n_kv_heads=1, head_dim=32)


@pytest.fixture(scope="module")
def params32(cfg32):
    return llama.init_params(cfg32, jax.random.key(1))


@pytest.fixture(scope="module")
def calibration():
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, 24).tolist() for _ in range(3)]


def test_dynamic_quantizer_is_absmax_quantization(tiny_params):
    got = quant.Quantizer("dynamic", "int8").transform(tiny_params)
    want = quant.quantize_params(tiny_params, "int8")
    np.testing.assert_array_equal(got["layers"]["wq"].values, want["layers"]["wq"].values)
    assert not quant.is_quantized(got["layers"]["attn_norm"])


def test_calibration_records_each_matrixs_input_moments(tiny_cfg, tiny_params, calibration):
    q = quant.Quantizer("static", "int8", calibration_data=calibration, config=tiny_cfg,
                        progress=False)
    moments = q.input_moments(tiny_params)
    L, D, H, Dh, F = (tiny_cfg.n_layers, tiny_cfg.embed_dim, tiny_cfg.n_heads,
                      tiny_cfg.head_dim, tiny_cfg.mlp_dim)
    assert moments["wq"].shape == (L, D) and moments["wo"].shape == (L, H, Dh)
    assert moments["w_down"].shape == (L, F) and moments["embed"].shape == (D,)
    # Layer 0's q/k/v input is the normed embedding: its mean square per channel is about
    # the norm weight squared (RMSNorm makes each token's mean square 1).
    norm = np.asarray(tiny_params["layers"]["attn_norm"][0])
    assert np.mean(moments["wq"][0] / norm**2) == pytest.approx(1.0, rel=0.05)
    assert all(np.all(m >= 0) for m in moments.values())


@pytest.mark.numerics
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_static_calibration_never_increases_the_weighted_error(cfg32, params32, calibration,
                                                               precision):
    q = quant.Quantizer("static", precision, calibration_data=calibration, config=cfg32,
                        progress=False)
    moments = q.input_moments(params32)
    static = q.transform(params32)
    dynamic = quant.quantize_params(params32, precision)
    improved = 0
    for name in ("wq", "wo", "w_gate", "w_down"):
        w = params32["layers"][name]
        axis = quant.CONTRACTION_AXES[name]
        weights = np.moveaxis(_broadcast_moments(moments[name], w.ndim, axis, name), -1, axis)

        def error(qw, w=w, weights=weights):
            return float(jnp.sum(weights * jnp.square(quant.dequantize(qw) - w)))

        assert error(static["layers"][name]) <= error(dynamic["layers"][name]) * (1 + 1e-6)
        improved += error(static["layers"][name]) < 0.99 * error(dynamic["layers"][name])
    if precision == "int4":  # 16 levels: clipping outliers pays off somewhere
        assert improved >= 1


def test_static_quantizer_needs_calibration_data(tiny_cfg):
    with pytest.raises(ValueError, match="needs calibration_data"):
        quant.Quantizer("static", "int8", config=tiny_cfg)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="method='awq'; allowed: dynamic, static"):
        quant.Quantizer("awq")


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_params_round_trip_through_orbax(tmp_path, cfg32, params32, precision):
    from jaxinfer.checkpoints import orbax

    cfg = dataclasses.replace(cfg32, quant=precision)
    params = quant.quantize_params(params32, precision)
    orbax.save(tmp_path / "ckpt", cfg, params)
    loaded_cfg, loaded, _ = orbax.load(tmp_path / "ckpt")
    assert loaded_cfg == cfg
    for name in ("wq", "wo", "w_down"):
        a, b = params["layers"][name], loaded["layers"][name]
        assert quant.is_quantized(b) and (a.bits, a.group, a.axis) == (b.bits, b.group, b.axis)
        np.testing.assert_array_equal(a.values, b.values)
        np.testing.assert_array_equal(a.scales, b.scales)
    np.testing.assert_array_equal(loaded["layers"]["attn_norm"], params["layers"]["attn_norm"])
