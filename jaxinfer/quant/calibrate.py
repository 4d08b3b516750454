"""The quantizer: dynamic (weights alone) or static (scales calibrated on activations).

Static calibration runs the float model over calibration token sequences and records, for
every matrix, the second moments of its inputs per contracted channel (E[x_d^2]). Each
quantization group then keeps the clip ratio from CLIP_GRID that minimises the
activation-weighted squared error sum_d E[x_d^2] (w_d - q(w)_d)^2, an estimate of the
output error ||x W - x Q(W)||^2 (exact for uncorrelated input channels). Ratio 1 (plain
absmax scales, the dynamic choice) is in the grid, so on the calibration data the
weighted error never gets worse than dynamic quantization's.
"""

from __future__ import annotations

import collections
import functools
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.quant import qarray
from jaxinfer.quant.model import CONTRACTION_AXES, quantize_params
from jaxinfer.quant.qarray import Probe, QArray, check_quant, dequantize, quantize

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
METHODS = ("dynamic", "static")


class Quantizer:
    """Quantizes a model's parameter pytree.

    method: "dynamic" (absmax scales from the weights) or "static" (clip ratios calibrated
    on `calibration_data`, a list of token id lists, run through the model given by `config`).
    precision: "int8" (per output channel, or `group`) or "int4" (groups of `group`, 32).

        params = Quantizer("static", "int4", calibration_data=ids, config=cfg).transform(params)
    """

    def __init__(
        self,
        method: str = "dynamic",
        precision: str = "int8",
        *,
        group: int | None = None,
        calibration_data: Sequence[Sequence[int]] | None = None,
        config: ModelConfig | None = None,
        progress: bool = True,
    ):
        if method not in METHODS:
            raise ValueError(f"method={method!r}; allowed: {', '.join(METHODS)}")
        check_quant(precision, group)
        if method == "static" and (not calibration_data or config is None):
            raise ValueError("method='static' needs calibration_data (token id lists) and the "
                             "model's config")
        self.method, self.precision, self.group = method, precision, group
        self.calibration_data, self.config, self.progress = calibration_data, config, progress

    def transform(self, params: dict[str, Any]) -> dict[str, Any]:
        """The params with every matrix quantized (norms, biases and vectors stay float)."""
        if self.method == "dynamic":
            return quantize_params(params, self.precision, self.group)
        moments = self.input_moments(params)

        def visit(path, leaf):
            name = getattr(path[-1], "key", None)
            if isinstance(leaf, QArray) or name not in CONTRACTION_AXES:
                return leaf
            return self._calibrated(leaf, name, moments[name])

        return jax.tree_util.tree_map_with_path(visit, params, is_leaf=qarray.keeps_structure)

    def input_moments(self, params: dict[str, Any]) -> dict[str, np.ndarray]:
        """Per matrix: mean squared input per contracted channel, [layers, ...] for stacked
        weights, from running the float model over the calibration data."""
        from jaxinfer.evaluate import forward_logits  # evaluation sits above quant

        sums: dict[str, dict[int, np.ndarray]] = collections.defaultdict(dict)
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

        def record(name: str, layer: int, moments: np.ndarray) -> None:
            previous = sums[name].get(layer)
            sums[name][layer] = moments if previous is None else previous + moments
            counts[name][layer] += 1

        probed = _probe(params, self.config.n_layers)
        qarray.recorder = record
        try:
            for i, tokens in enumerate(self.calibration_data, 1):
                jax.block_until_ready(forward_logits(probed, tokens, self.config))
                if self.progress:
                    print(f"\rcalibrating: {i}/{len(self.calibration_data)} sequences",
                          end="", file=sys.stderr, flush=True)
            jax.effects_barrier()
        finally:
            qarray.recorder = None
        if self.progress:
            print(file=sys.stderr)
        means = {}
        for name, by_layer in sums.items():
            layers = sorted(by_layer)
            stacked = [by_layer[k] / counts[name][k] for k in layers]
            means[name] = stacked[0] if layers == [-1] else np.stack(stacked)
        return means

    def _calibrated(self, w: jax.Array, name: str, moments: np.ndarray) -> QArray:
        axis = CONTRACTION_AXES[name]
        group = self.group or (32 if self.precision == "int4" else None)
        weights = _broadcast_moments(moments, w.ndim, axis, name)
        return _search_clip(w, jnp.asarray(weights), self.precision, axis, group)


def _probe(params: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Every matrix wrapped in a Probe carrying its layer index (scanned with the layers)."""

    def visit(path, leaf):
        name = getattr(path[-1], "key", None)
        if name not in CONTRACTION_AXES:
            return leaf
        stacked = path[0].key == "layers"
        layer = jnp.arange(n_layers) if stacked else jnp.int32(-1)
        return Probe(leaf, layer, name)

    return jax.tree_util.tree_map_with_path(visit, params)


# Which dims of each matrix (in its own layout, layers axis excluded) its inputs' moments
# cover: the contracted ones (wo contracts heads and head_dim).
CONTRACTED_DIMS = {"wq": (0,), "wk": (0,), "wv": (0,), "wo": (0, 1), "w_gate": (0,),
                   "w_up": (0,), "w_down": (0,), "embed": (1,), "lm_head": (1,)}


def _broadcast_moments(moments: np.ndarray, ndim: int, axis: int, name: str) -> np.ndarray:
    """Moments [layers?, contracted dims] -> broadcastable against the weight's storage
    layout ([layers?, ..., in])."""
    dims = CONTRACTED_DIMS[name]
    lead = moments.ndim - len(dims)  # 1 for stacked weights (the layers axis)
    shape = list(moments.shape[:lead]) + [1] * (ndim - lead)
    for i, d in enumerate(dims):
        shape[lead + d] = moments.shape[lead + i]
    return np.moveaxis(moments.reshape(shape), axis, -1)


@functools.partial(jax.jit, static_argnames=("precision", "axis", "group"))
def _search_clip(w, weights, precision: str, axis: int, group: int | None) -> QArray:
    """Per quantization group, the clip ratio in CLIP_GRID with the least weighted error."""
    stored = jnp.moveaxis(w.astype(jnp.float32), axis, -1)
    size = group or stored.shape[-1]
    grouped = stored.reshape(*stored.shape[:-1], -1, size)
    wts = jnp.broadcast_to(weights, stored.shape).reshape(grouped.shape)
    best_err, best_clip = None, None
    for clip in CLIP_GRID:
        q = quantize(w, precision, axis=axis, group=group, clip=clip)
        back = jnp.moveaxis(dequantize(q), axis, -1).reshape(grouped.shape)
        err = jnp.sum(wts * jnp.square(back - grouped), axis=-1)
        if best_err is None:
            best_err, best_clip = err, jnp.full_like(err, clip)
        else:
            better = err < best_err
            best_err = jnp.where(better, err, best_err)
            best_clip = jnp.where(better, clip, best_clip)
    return quantize(w, precision, axis=axis, group=group, clip=best_clip)
