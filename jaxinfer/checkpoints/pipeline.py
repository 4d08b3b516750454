"""The one loading pipeline: a format's tensor source in, a placed params pytree out.

A format supplies a `TensorSource`: which stored tensor is which parameter (and layer), its
layout and stored shape, and how to read it. `assemble` does the rest for every format:
checks names and shapes before any data is read, shows progress, stacks per-layer tensors
on the host one parameter at a time, quantizes (`quantize_param`, the one place QArrays are
built), places each parameter on its sharding and frees the host copy before reading the
next, so host memory peaks near the parameters placed so far plus one stacked weight.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

import jaxinfer.progress
from jaxinfer.checkpoints import gguf_quant
from jaxinfer.checkpoints.model import CheckpointError
from jaxinfer.config import NP_DTYPES, ModelConfig
from jaxinfer.models import family
from jaxinfer.quant import CONTRACTION_AXES, QArray, quantize
from jaxinfer.quant.qarray import stored_shape as quantized_storage
from jaxinfer.sharding import param_shardings
from jaxinfer.sharding.rules import place, sharding_at

# Stored array (numpy order: [out, in] for matrices) -> our parameter's layer `shape`.
LAYOUTS: dict[str, Callable[[np.ndarray, tuple[int, ...], ModelConfig], np.ndarray]] = {
    "vector": lambda w, shape, cfg: w,
    # GGUF stores every norm as the whole scale (offset + w)
    "norm": lambda w, shape, cfg: w - np.float32(cfg.norm_offset),
    # [heads * head_dim, embed] -> [embed, heads, head_dim]
    "qkv": lambda w, shape, cfg: w.T.reshape(shape),
    # the same, after undoing llama.cpp's rotary row permutation
    "qkv_rotary": lambda w, shape, cfg: unpermute_rotary(w, shape[1]).T.reshape(shape),
    "bias": lambda w, shape, cfg: w.reshape(shape),  # [heads * head_dim] -> [heads, head_dim]
    # [embed, heads * head_dim] -> [heads, head_dim, embed]
    "o": lambda w, shape, cfg: w.T.reshape(shape),
    "in_out": lambda w, shape, cfg: w.T,  # [out, in] -> [in, out]
    # one layer's experts in one tensor: [experts, out, in] -> [experts, in, out]
    "experts_in_out": lambda w, shape, cfg: w.swapaxes(-1, -2),
    # gpt-oss's fused gate/up: gate in the even, up in the odd last-axis entries
    "even_cols": lambda w, shape, cfg: w[..., ::2],
    "odd_cols": lambda w, shape, cfg: w[..., 1::2],
}


def stored_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a tensor of `layout` has in the file, given our parameter's layer shape."""
    if layout in ("qkv", "qkv_rotary"):
        return (shape[1] * shape[2], shape[0])
    if layout == "bias":
        return (shape[0] * shape[1],)
    if layout == "o":
        return (shape[2], shape[0] * shape[1])
    if layout == "in_out":
        return shape[::-1]
    if layout == "experts_in_out":
        return (shape[0], *shape[:0:-1])
    if layout in ("even_cols", "odd_cols"):
        return (*shape[:-1], 2 * shape[-1])
    return shape


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (interleaved rotary -> rotate_half order)."""
    out_dim = w.shape[0]
    return (w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _rows_order(layout: str, shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray] | None:
    """How a quantized tensor's stored rows ([out, ...]) move into QArray storage order."""
    if layout == "qkv_rotary":
        return lambda x: unpermute_rotary(x, shape[1])
    if layout == "o":  # [embed, heads * ...] -> [heads, embed, ...]
        return lambda x: x.reshape(shape[2], shape[0], -1).transpose(1, 0, 2)
    return None


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor of a checkpoint, mapped onto a parameter.

    param: our parameter's name ("wq", "embed"); None for a tensor the format does not know
    (an error naming it). layer: its index on the stacked `layers` axis (None: a global
    parameter). expert: its index on the `experts` axis that follows (None: not per expert).
    shape: as stored, numpy order. read(): the array as stored (numpy order, any
    float dtype). read_blocks(storage, axis, rows_order): the tensor's own quantized blocks
    as a numpy-backed QArray, or None where its type has no exact QArray form.
    """

    name: str
    param: str | None
    layer: int | None
    layout: str
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]
    read_blocks: Callable[..., QArray | None] | None = None
    origin: str | None = None  # the file it is stored in, for messages (None: the source)
    expert: int | None = None  # one expert of a MoE weight stacked [layers, experts, ...]


class TensorSource(Protocol):
    """A checkpoint format's view of one checkpoint: `name` (the file or directory, for
    messages), `config_name` (what the ModelConfig was read from, for messages), `tensors`
    (every tensor the model is built from), and optionally `release()` (called after each
    parameter: drop the file pages read so far from resident memory)."""

    name: str
    config_name: str
    tensors: Sequence[StoredTensor]


def assemble(source: TensorSource, cfg: ModelConfig, *, mesh: Any = None,
             progress: bool = True) -> dict:
    """The params pytree of `cfg` (dtype `cfg.param_dtype`, quantized as `cfg.quant`) from
    `source`, each parameter placed on its sharding over `mesh` (None: the default device)."""
    if cfg.quant is not None and mesh is not None:
        raise ValueError("quantized weights cannot be placed on a mesh yet; load them on one "
                         "device (mesh=None) or without quant")
    abstract = family(cfg.architecture).abstract_params(cfg)
    shardings = None if mesh is None else param_shardings(cfg, mesh)
    stored = list(source.tensors)
    plan = _plan(source, stored, cfg, abstract)
    total, done, start = len(stored), 0, time.perf_counter()

    def tick(count: int = 1) -> None:
        nonlocal done
        done += count
        if progress and (done % 16 < count or done == total):
            jaxinfer.progress.status(f"loading {Path(source.name).name}: {done}/{total} tensors "
                                     f"({time.perf_counter() - start:.1f}s)")

    params: dict[str, Any] = {"layers": {}}
    for path, tensors in plan.items():
        stacked, name = len(path) == 2, path[-1]
        node = params["layers"] if stacked else params
        shape = (abstract["layers"] if stacked else abstract)[name].shape
        lead = 2 if tensors[0].expert is not None else 1 if stacked else 0  # stacked axes
        layer_shape = shape[lead:]
        if cfg.quant is not None and name in CONTRACTION_AXES:
            quantized = quantize_param(tensors, layer_shape, name, cfg, stacked=stacked)
            if lead == 2:  # [layers * experts, ...] -> [layers, experts, ...]
                quantized = jax.tree.map(
                    lambda a, s=shape[:2]: a.reshape(*s, *a.shape[1:]), quantized)
            node[name] = jax.device_put(quantized)
            tick(len(tensors))
        elif not stacked:
            node[name] = place(_convert(tensors[0], shape, cfg), sharding_at(shardings, *path))
            tick()
        else:
            host = aligned_empty(shape, NP_DTYPES[cfg.param_dtype])
            flat = host.reshape(-1, *layer_shape)  # one slot per layer (and expert)
            for index, tensor in enumerate(tensors):
                flat[index] = _convert(tensor, layer_shape, cfg)
                tick()
            node[name] = place(host, sharding_at(shardings, *path))
            del host  # the host copy goes before the next weight is read
        if hasattr(source, "release"):
            source.release()
    if progress:
        jaxinfer.progress.end_status()
    return params


def aligned_empty(shape: tuple[int, ...], dtype, alignment: int = 64) -> np.ndarray:
    """np.empty on a 64-byte boundary: XLA:CPU then adopts the buffer as the device array
    instead of copying it (measured: a 113 MB weight placed in 4 ms instead of 190 ms), and
    keeps it alive for as long as the array lives."""
    size = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(size + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + size].view(dtype).reshape(shape)


def quantize_param(tensors: list[StoredTensor], layer_shape: tuple[int, ...], param: str,
                   cfg: ModelConfig, *, stacked: bool) -> QArray:
    """One parameter as a host QArray, its per-layer `tensors` stacked when `stacked`.

    quant "gguf" keeps the stored blocks where every layer's have an exact QArray form of
    one format; otherwise (and for "int8" / "int4") the floats are quantized here.
    """
    axis = CONTRACTION_AXES[param]
    if cfg.quant == "gguf":
        storage = quantized_storage(layer_shape, axis)
        native = [t.read_blocks(storage, axis, _rows_order(t.layout, layer_shape))
                  if t.read_blocks else None for t in tensors]
        if all(q is not None for q in native):
            if not stacked:
                return native[0]
            if (joined := gguf_quant.stack(native)) is not None:
                return joined
    precision = "int8" if cfg.quant == "gguf" else cfg.quant
    layers = [quantize(_convert(t, layer_shape, cfg, np.float32), precision, axis=axis)
              for t in tensors]
    return gguf_quant.stack(layers) if stacked else layers[0]


def _convert(tensor: StoredTensor, layer_shape: tuple[int, ...], cfg: ModelConfig,
             dtype=None) -> np.ndarray:
    value = LAYOUTS[tensor.layout](tensor.read(), layer_shape, cfg)
    return value.astype(dtype or NP_DTYPES[cfg.param_dtype], copy=False)


def _plan(source: TensorSource, stored: list[StoredTensor], cfg: ModelConfig, abstract: dict
          ) -> dict[tuple[str, ...], list[StoredTensor]]:
    """Parameter path -> its tensors (one per layer for stacked ones), every name and shape
    checked against the config before any data is read."""
    layer_params = abstract["layers"]
    per_expert = {p for p in layer_params if cfg.n_experts and p.startswith("expert_")}
    found: dict[tuple[str, ...], dict[int, StoredTensor]] = {}
    for tensor in stored:
        where = tensor.origin or source.name
        stacked = tensor.layer is not None
        known = layer_params if stacked else {k: v for k, v in abstract.items() if k != "layers"}
        if tensor.param not in known or (stacked and not 0 <= tensor.layer < cfg.n_layers) or (
                tensor.expert is not None and tensor.param not in per_expert):
            raise CheckpointError(f"{where}: unexpected tensor {tensor.name!r} for this "
                                  f"{cfg.architecture} config ({cfg.n_layers} layers)")
        if tensor.expert is not None and not 0 <= tensor.expert < cfg.n_experts:
            raise CheckpointError(
                f"{where}: tensor {tensor.name!r} is expert {tensor.expert}, but "
                f"{source.config_name} says the model has {cfg.n_experts} experts per layer "
                f"(0..{cfg.n_experts - 1})")
        lead = 2 if tensor.expert is not None else 1 if stacked else 0
        shape = known[tensor.param].shape[lead:]
        expected = stored_shape(tensor.layout, shape)
        if tuple(tensor.shape) != expected:
            moe = (f", experts={cfg.n_experts}, expert_mlp_dim={cfg.expert_mlp_dim}"
                   if cfg.n_experts else "")
            raise CheckpointError(
                f"{where}: tensor {tensor.name!r} has shape {tuple(tensor.shape)}; "
                f"{source.config_name} implies {expected} (embed_dim={cfg.embed_dim}, "
                f"heads={cfg.n_heads}, kv_heads={cfg.n_kv_heads}, head_dim={cfg.head_dim}, "
                f"mlp_dim={cfg.mlp_dim}, vocab={cfg.vocab_size}{moe})")
        path = ("layers", tensor.param) if stacked else (tensor.param,)
        slot = tensor.layer if stacked else 0
        if tensor.param in per_expert:  # one expert, or (expert None) all of a layer's at once
            slot = slot * cfg.n_experts + (tensor.expert or 0)
        if slot in found.setdefault(path, {}):
            raise CheckpointError(f"{where}: tensor {tensor.name!r} appears twice (as "
                                  f"{found[path][slot].name!r} too)")
        found[path][slot] = tensor

    def expected_slots(p: str) -> dict[int, str]:
        if p not in per_expert:
            return {i: f"layers.{p}.{i}" for i in range(cfg.n_layers)}
        if any(t.expert is None for t in found.get(("layers", p), {}).values()):
            return {i * cfg.n_experts: f"layers.{p}.{i}" for i in range(cfg.n_layers)}
        return {i: f"layers.{p}.{i // cfg.n_experts}.expert{i % cfg.n_experts}"
                for i in range(cfg.n_layers * cfg.n_experts)}

    missing = [k for k in abstract if k != "layers" and (k,) not in found] + [
        name for p in layer_params for i, name in expected_slots(p).items()
        if i not in found.get(("layers", p), {})]
    if missing:
        experts = f" ({cfg.n_experts} experts per layer)" if cfg.n_experts else ""
        raise CheckpointError(f"{source.name}: missing tensors{experts} (jaxinfer's names): "
                              f"{', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    return {path: [by_slot[i] for i in sorted(by_slot)] for path, by_slot in found.items()}
