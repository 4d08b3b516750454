"""The parameter declaration: one place gives shapes, dtypes, logical axes and random init."""

from __future__ import annotations

import jax

from jaxinfer.models import llama


def test_every_parameter_names_one_logical_axis_per_dimension(tiny_cfg):
    shapes = llama.abstract_params(tiny_cfg)
    axes = llama.logical_axes(tiny_cfg)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    assert jax.tree.structure(shapes) == jax.tree.structure(axes, is_leaf=is_spec)
    pairs = zip(jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=is_spec), strict=True)
    for shape, names in pairs:
        assert len(shape.shape) == len(names)
    assert tuple(axes["layers"]["wq"]) == ("layers", "embed", "heads", "head_dim")


def test_init_params_match_the_abstract_shapes(tiny_cfg, tiny_params):
    expected = llama.abstract_params(tiny_cfg)
    actual = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tiny_params)
    assert actual == expected
    assert tiny_params["layers"]["wq"].shape[0] == tiny_cfg.n_layers  # stacked for scan


def test_untied_models_declare_an_lm_head(tiny_cfg):
    import dataclasses

    untied = dataclasses.replace(tiny_cfg, tie_embeddings=False)
    assert "lm_head" in llama.abstract_params(untied)
    assert "lm_head" not in llama.abstract_params(tiny_cfg)
