"""Orbax checkpoints on one device: round trip, dtype on restore, and clear errors.

Restoring onto a different (8-device) mesh is checked in test_sharding_multidevice.py.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxinfer.checkpoints import orbax


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_cfg, tiny_params):
    return orbax.save(tmp_path_factory.mktemp("ckpt") / "tiny", tiny_cfg, tiny_params)


def test_round_trip_restores_config_and_identical_params(checkpoint, tiny_cfg, tiny_params):
    cfg, params, tokenizer = orbax.load(checkpoint)
    assert cfg == tiny_cfg
    assert tokenizer is None  # none was saved
    jax.tree.map(np.testing.assert_array_equal, params, tiny_params)


def test_restore_casts_to_the_requested_dtype(checkpoint, tiny_params):
    cfg, params, _ = orbax.load(checkpoint, dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16"
    assert params["layers"]["wq"].dtype == jax.numpy.bfloat16
    np.testing.assert_allclose(np.asarray(params["embed"], np.float32),
                               np.asarray(tiny_params["embed"]), rtol=1e-2)


def test_saving_over_an_existing_checkpoint_needs_overwrite(checkpoint, tiny_cfg, tiny_params):
    with pytest.raises(orbax.CheckpointError, match="exists and is not empty; pass overwrite"):
        orbax.save(checkpoint, tiny_cfg, tiny_params)


def test_missing_checkpoint_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*nowhere"):
        orbax.load(tmp_path / "nowhere")


def test_directory_without_a_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(orbax.CheckpointError, match=r"not a jaxinfer Orbax checkpoint.*"
                                                   r"jaxinfer.launch.convert"):
        orbax.load(tmp_path)


def test_checkpoint_of_another_architecture_than_expected_is_refused(checkpoint):
    with pytest.raises(orbax.CheckpointError, match=r"holds a 'llama' model; expected 'gemma3'"):
        orbax.load(checkpoint, architecture="gemma3")


def test_checkpoint_of_an_unsupported_architecture_names_the_supported_ones(tmp_path, tiny_cfg):
    (tmp_path / "params").mkdir()
    config = {"format": orbax.FORMAT, "format_version": orbax.FORMAT_VERSION,
              **dataclasses.asdict(tiny_cfg), "architecture": "mamba"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported architecture 'mamba'; supported: .*llama"):
        orbax.load(tmp_path)


def test_params_that_do_not_match_the_config_are_refused(checkpoint, tmp_path, tiny_cfg):
    import shutil

    shutil.copytree(checkpoint, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["mlp_dim"] = tiny_cfg.mlp_dim * 2
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(orbax.CheckpointError, match=r"has shape .*; the config declares"):
        orbax.load(tmp_path / "ckpt")
