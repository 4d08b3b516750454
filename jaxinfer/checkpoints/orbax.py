"""Orbax checkpoints: params + ModelConfig (+ tokenizer files), restored straight onto a mesh.

Layout of a checkpoint directory:

    params/                  Orbax (tensorstore) arrays, one per parameter
    config.json              ModelConfig fields and the format marker
    tokenizer.json           Hugging Face tokenizers file (when a tokenizer was saved)
    tokenizer_config.json    BOS/EOS/PAD, add_bos, chat template, stop ids
    quant.json               for quantized params (config "quant"): each QArray's bits,
                             group and axis; its arrays are saved as values/scales/zeros

Restoring reads each array directly into its target sharding: every device (of every
process) reads only its own slice from disk, so no full array is built on a host.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from jaxinfer.checkpoints.model import CheckpointError, Model, OnConfig
from jaxinfer.config import ModelConfig
from jaxinfer.models import family
from jaxinfer.quant import QArray, is_quantized
from jaxinfer.sharding import param_shardings
from jaxinfer.tokenizer import Tokenizer

FORMAT = "jaxinfer-orbax"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
QUANT_FILE = "quant.json"


def _checkpointer():
    """Orbax's checkpointer; imported on first use, so loading other formats skips its
    import (a tenth of `import jaxinfer`)."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory holding a jaxinfer Orbax checkpoint."""
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / PARAMS_DIR).is_dir()


def save(
    path: str | os.PathLike,
    cfg: ModelConfig,
    params: Any,
    tokenizer: Tokenizer | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Writes params (sharded or not; every process must call this) and the config files."""
    path = Path(path).expanduser().absolute()
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise CheckpointError(f"{path} exists and is not empty; pass overwrite=True "
                              "(--overwrite) or choose another output directory")
    if jax.process_count() > 1:  # every process checked before any of them writes
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxinfer.orbax.save")
    start = time.perf_counter()
    params, layout = _split_quantized(params)
    with _checkpointer() as checkpointer:
        checkpointer.save(path / PARAMS_DIR, params, force=overwrite)
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:  # small files: one writer
        config = {"format": FORMAT, "format_version": FORMAT_VERSION,
                  **dataclasses.asdict(cfg)}
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            _save_tokenizer(path, tokenizer)
        if layout:
            (path / QUANT_FILE).write_text(json.dumps(layout, indent=2) + "\n")
    print(f"saved {path} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return path


def read_config(path: str | os.PathLike, architecture: str | None = None) -> ModelConfig:
    """The ModelConfig of the checkpoint at `path`; `architecture` checks which model it is."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: the directory does not exist")
    if not is_checkpoint(path):
        raise CheckpointError(
            f"{path} is not a jaxinfer Orbax checkpoint (it needs {CONFIG_FILE} and "
            f"{PARAMS_DIR}/); make one with: python -m jaxinfer.launch.convert "
            f"--model=<model> --output={path}")
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.pop("format", None) != FORMAT:
        raise CheckpointError(f"{path / CONFIG_FILE} is not a {FORMAT} config")
    version = config.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version}; this jaxinfer reads "
                              f"version {FORMAT_VERSION}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown := sorted(set(config) - fields):
        raise CheckpointError(f"{path / CONFIG_FILE}: unknown config fields {unknown} "
                              "(written by a newer jaxinfer?)")
    cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    if architecture is not None and cfg.architecture != architecture:
        raise CheckpointError(f"{path} holds a {cfg.architecture!r} model; expected "
                              f"{architecture!r}")
    family(cfg.architecture)  # unsupported architectures fail here, naming the supported ones
    return cfg


def load(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    dtype: str | None = None,
    architecture: str | None = None,
    on_config: OnConfig | None = None,
) -> Model:
    """A `Model` from a checkpoint (its tokenizer None if none was saved), each parameter
    read straight into its sharding on `mesh` (None: the default device), cast to `dtype`
    if given. `on_config(config, tokenizer)` is called before any weight is read."""
    path = Path(path).expanduser().absolute()
    cfg = read_config(path, architecture)
    if dtype is not None:
        cfg = cfg.with_dtype(dtype)
    tokenizer = _load_tokenizer(path)
    if on_config is not None:
        on_config(cfg, tokenizer)
    if cfg.quant is not None:
        return Model(cfg, _load_quantized(path, mesh), tokenizer)
    abstract = family(cfg.architecture).abstract_params(cfg)
    if mesh is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                                 abstract)
    else:
        shardings = param_shardings(cfg, mesh)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    start = time.perf_counter()
    with _checkpointer() as checkpointer:
        saved = checkpointer.metadata(path / PARAMS_DIR).item_metadata
        _check_tree(path, saved, abstract)
        params = checkpointer.restore(path / PARAMS_DIR, target)
    print(f"restored {path.name} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return Model(cfg, params, tokenizer)


def _split_quantized(params: Any) -> tuple[Any, dict[str, dict]]:
    """QArrays -> plain {"values", "scales", "zeros"} dicts (what Orbax stores), and their
    static fields by parameter path."""
    layout = {}

    def visit(key_path, leaf):
        if not isinstance(leaf, QArray):
            return leaf
        layout[jax.tree_util.keystr(key_path)] = {"bits": leaf.bits, "group": leaf.group,
                                                  "axis": leaf.axis}
        arrays = {"values": leaf.values, "scales": leaf.scales}
        return arrays if leaf.zeros is None else arrays | {"zeros": leaf.zeros}

    params = jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_quantized)
    return params, layout


def _load_quantized(path: Path, mesh: Mesh | None) -> Any:
    """Quantized params: the saved arrays as they are, regrouped into QArrays."""
    if mesh is not None:
        raise CheckpointError(f"{path} holds quantized weights, which cannot be placed on a "
                              "mesh yet; load it without a mesh")
    if not (path / QUANT_FILE).is_file():
        raise CheckpointError(f"{path}: the config says quantized but {QUANT_FILE} is missing")
    layout = json.loads((path / QUANT_FILE).read_text())
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    start = time.perf_counter()
    with _checkpointer() as checkpointer:
        saved = checkpointer.metadata(path / PARAMS_DIR).item_metadata
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), saved)
        params = checkpointer.restore(path / PARAMS_DIR, target)

    def regroup(node, prefix=""):
        if isinstance(node, dict):
            key = prefix
            if key in layout:
                return QArray(node["values"], node["scales"], node.get("zeros"),
                              **layout[key])
            return {k: regroup(v, f"{prefix}['{k}']") for k, v in node.items()}
        return node

    print(f"restored {path.name} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return regroup(dict(params))


def _check_tree(path: Path, saved: Any, abstract: Any) -> None:
    """The saved parameter names and shapes must be the ones the config declares."""
    want = {jax.tree_util.keystr(k): a.shape
            for k, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    have = {jax.tree_util.keystr(k): tuple(m.shape)
            for k, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
    if want.keys() != have.keys():
        raise CheckpointError(f"{path}: parameters {sorted(have.keys() ^ want.keys())[:6]} do "
                              "not match the model its config describes")
    if bad := [k for k in want if want[k] != have[k]]:
        raise CheckpointError(f"{path}: {bad[0]} has shape {have[bad[0]]}; the config "
                              f"declares {want[bad[0]]}")


def _save_tokenizer(path: Path, tokenizer: Tokenizer) -> None:
    backend = tokenizer._backend  # the tokenizers.Tokenizer the class wraps
    backend.save(str(path / TOKENIZER_FILE))

    def text(token_id: int | None) -> str | None:
        return None if token_id is None else tokenizer.token_text(token_id)

    config = {
        "bos_token": text(tokenizer.bos_id),
        "eos_token": text(tokenizer.eos_id),
        "pad_token": text(tokenizer.pad_id),
        "add_bos_token": tokenizer.add_bos,
        "chat_template": tokenizer.chat_template,
        "stop_token_ids": list(tokenizer.stop_ids),  # GGUF's EOT/EOM ids have no HF key
    }
    (path / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def _load_tokenizer(path: Path) -> Tokenizer | None:
    if not (path / TOKENIZER_FILE).is_file():
        return None
    tokenizer = Tokenizer.from_file(path / TOKENIZER_FILE, path / TOKENIZER_CONFIG_FILE)
    config = json.loads((path / TOKENIZER_CONFIG_FILE).read_text())
    if "stop_token_ids" in config:
        tokenizer.stop_ids = tuple(config["stop_token_ids"])
    return tokenizer

