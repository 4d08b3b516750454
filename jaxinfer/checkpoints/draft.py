"""Draft heads on disk (jaxinfer.draft_heads): an Orbax checkpoint of the heads' arrays and a
draft.json naming the model they were distilled from, checked when they are loaded.

    draft.json    format marker, heads, the target model's architecture / sizes, training
    heads/        Orbax (tensorstore) arrays w_in, w_out
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxinfer.checkpoints.model import CheckpointError
from jaxinfer.config import ModelConfig

FORMAT = "jaxinfer-draft-heads"
FORMAT_VERSION = 1
META_FILE = "draft.json"
HEADS_DIR = "heads"
# What the heads must agree with: they read this model's hidden states and unembedding.
TARGET_FIELDS = ("architecture", "embed_dim", "vocab_size", "n_layers")


def save(path: str | os.PathLike, heads: dict, cfg: ModelConfig,
         training: dict[str, Any] | None = None) -> Path:
    """Writes `heads` (trained for the model of `cfg`) and draft.json into `path`."""
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().absolute()
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / HEADS_DIR, jax.tree.map(np.asarray, heads), force=True)
        checkpointer.wait_until_finished()
    meta = {"format": FORMAT, "version": FORMAT_VERSION,
            "num_heads": int(heads["w_in"].shape[0]),
            "hidden_dim": int(heads["w_in"].shape[2]),
            "target": {f: getattr(cfg, f) for f in TARGET_FIELDS},
            "training": training or {}}
    (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load(path: str | os.PathLike, cfg: ModelConfig) -> dict:
    """The heads saved at `path`, as float32 arrays; CheckpointError when they were trained
    for another model (they read its hidden states) or the files are not draft heads."""
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().absolute()
    meta_file = path / META_FILE
    if not meta_file.is_file() or not (path / HEADS_DIR).is_dir():
        raise CheckpointError(f"{path}: not draft heads (no {META_FILE} and {HEADS_DIR}/); "
                              "train them with python -m jaxinfer.launch.distill")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_file}: format {meta.get('format')!r} version "
                              f"{meta.get('version')!r}; expected {FORMAT!r} {FORMAT_VERSION}")
    wrong = {f: (meta["target"].get(f), getattr(cfg, f)) for f in TARGET_FIELDS
             if meta["target"].get(f) != getattr(cfg, f)}
    if wrong:
        raise CheckpointError(f"{path}: these draft heads were trained for another model ("
                              + ", ".join(f"{f} {a!r}, this model's {b!r}"
                                          for f, (a, b) in wrong.items()) + ")")
    heads, embed = meta["num_heads"], cfg.embed_dim
    shapes = {"w_in": (heads, 2 * embed, meta["hidden_dim"]),
              "w_out": (heads, meta["hidden_dim"], embed)}
    target = {k: jax.ShapeDtypeStruct(s, np.float32) for k, s in shapes.items()}
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(path / HEADS_DIR, target)
    return dict(restored)
