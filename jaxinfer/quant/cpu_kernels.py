"""Quantized weights the CPU kernels read where they lie (`jaxinfer.kernels.cpu`).

XLA:CPU copies a stacked weight's layer slice before every product that reads it, and its
one-row products on int8 / int4 first write a float copy of the whole weight (DESIGN.md,
"XLA:CPU facts"). An `InPlace` view hands the kernel the whole stacked QArray and the layer
index instead, so a decode step reads each weight byte once. Products the kernels do not
cover (more than `MAX_ROWS` rows, other layouts) read the view's slice through XLA as before.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxinfer.kernels import cpu
from jaxinfer.quant.qarray import QArray, _letters


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class InPlace:
    """Layer `layer` of a stacked QArray [layers, ...] (or, with layer None, the QArray
    itself), read in place by the CPU kernels with fp32 or int8 activations."""

    weight: QArray
    layer: jax.Array | None
    activations: str = dataclasses.field(metadata=dict(static=True))
    # Products with more rows go to XLA (faster for a long prefill); None: every product runs
    # on the kernel, so a row's bits never depend on the number of rows (batch_invariant).
    max_rows: int | None = dataclasses.field(default=cpu.MAX_ROWS, metadata=dict(static=True))

    def materialize(self) -> QArray:
        return self.weight if self.layer is None else self.weight[self.layer]

    def product(self, spec: str, x: jax.Array) -> jax.Array | None:
        """`product(spec, x, self)`: qarray.einsum calls it without importing this module."""
        return product(spec, x, self)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.materialize().shape if self.layer is None else self.weight.shape[1:]


def _eligible(w: Any, mode: str) -> bool:
    if mode == "off" or not isinstance(w, QArray) or w.scales.dtype != jnp.float32:
        return False
    in_dim = w.values.shape[-1] * (8 // w.bits)
    return cpu.supports(w.bits, w.group, in_dim) and cpu.usable_here()


def in_place(w: Any, mode: str, max_rows: int | None = cpu.MAX_ROWS) -> Any:
    """`w` as an InPlace view when the CPU kernels (`mode`: ModelConfig.cpu_kernels) cover
    it; otherwise `w` unchanged."""
    return InPlace(w, None, mode, max_rows) if _eligible(w, mode) else w


def split_stacked(layers: dict[str, Any], mode: str) -> tuple[dict, dict]:
    """Stacked per-layer weights -> (those the kernels read in place, kept whole; the rest,
    for `lax.scan` to slice)."""
    whole = {k: w for k, w in layers.items() if _eligible(w, mode)}
    return whole, {k: w for k, w in layers.items() if k not in whole}


def layer_views(whole: dict[str, Any], layer: jax.Array, mode: str,
                max_rows: int | None = cpu.MAX_ROWS) -> dict[str, InPlace]:
    """Views of layer `layer` of each stacked weight in `whole` (from `split_stacked`)."""
    return {k: InPlace(w, layer, mode, max_rows) for k, w in whole.items()}


def product(spec: str, x: jax.Array, view: InPlace) -> jax.Array | None:
    """`einsum(spec, x, weight)` in fp32 through the kernel, or None when it doesn't apply.

    The stored weight must read as [parts..., free..., q]: the quantized contraction letter q
    last, other contracted letters (parts) first; rows are x's letters the weight lacks.
    """
    w = view.weight
    stored = w.values.shape[1:] if view.layer is not None else w.values.shape
    x_letters, w_letters, out = _letters(spec, x)
    if len(w_letters) != len(stored) or len(set(x_letters)) != len(x_letters):
        return None
    q = w_letters[w.axis]
    order = [c for c in w_letters if c != q] + [q]  # storage order
    contracted = [c for c in order if c in x_letters and c not in out]
    if q not in contracted or any(c in x_letters and c in out for c in w_letters):
        return None
    parts = [c for c in order[:-1] if c in contracted]
    free = [c for c in order[:-1] if c not in contracted]
    rows = [c for c in x_letters if c not in w_letters]
    if order[:-1] != parts + free or sorted(out) != sorted(rows + free):
        return None
    size = dict(zip(order, stored, strict=True))
    n_rows = math.prod(x.shape[x_letters.index(c)] for c in rows)
    if view.max_rows is not None and n_rows > view.max_rows:
        return None
    n_parts, n_out = math.prod(size[c] for c in parts), math.prod(size[c] for c in free)
    lead = w.values.shape[0] if view.layer is not None else 1
    xr = jnp.transpose(x, [x_letters.index(c) for c in rows + parts + [q]])
    xr = xr.reshape(n_rows, -1)

    def as_4d(a):
        return None if a is None else a.reshape(lead, n_parts, n_out, a.shape[-1])

    y = cpu.qmatmul(xr, as_4d(w.values), as_4d(w.scales), as_4d(w.zeros),
                    0 if view.layer is None else view.layer, group=w.group,
                    activations=view.activations)
    row_shape = [x.shape[x_letters.index(c)] for c in rows]
    y = y.reshape(*row_shape, *[size[c] for c in free])
    have = rows + free
    return jnp.transpose(y, [have.index(c) for c in out])
