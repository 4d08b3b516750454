"""The one loading pipeline: a format in a few lines, its checks, the GGUF header walker
against the gguf package, and the tokenizer cache."""

from __future__ import annotations

import dataclasses

import gguf
import jax
import numpy as np
import pytest
from gguf_files import tiny_hf_llama, write_llama_gguf

from jaxinfer.checkpoints import CheckpointError, gguf_vocab, pipeline
from jaxinfer.checkpoints import gguf as gguf_loader
from jaxinfer.checkpoints.families import FAMILIES
from jaxinfer.models import FAMILIES as MODEL_FAMILIES
from jaxinfer.quant import QArray, quantize

Q = gguf.GGMLQuantizationType


@dataclasses.dataclass
class NpzSource:
    """A whole checkpoint format: jaxinfer's own layout saved with np.savez, "layers.wq.3"."""

    file: object
    name: str = "tiny.npz"
    config_name: str = "the test config"

    @property
    def tensors(self):
        def stored(key):
            parts = key.split(".")
            layer = int(parts[2]) if parts[0] == "layers" else None
            return pipeline.StoredTensor(key, parts[1] if layer is not None else parts[0],
                                         layer, "vector", self.file[key].shape,
                                         read=lambda: self.file[key])
        return [stored(key) for key in self.file.files]


def save_npz(path, params, skip=(), extra=None):
    arrays = {f"layers.{p}.{i}": np.asarray(w[i]) for p, w in params["layers"].items()
              for i in range(w.shape[0])}
    arrays |= {k: np.asarray(v) for k, v in params.items() if k != "layers"}
    arrays |= extra or {}
    np.savez(path, **{k: v for k, v in arrays.items() if k not in skip})
    return np.load(path)


def test_a_new_format_is_a_tensor_source_and_loads_identical_params(tmp_path, tiny_cfg,
                                                                    tiny_params):
    params = pipeline.assemble(NpzSource(save_npz(tmp_path / "t.npz", tiny_params)), tiny_cfg,
                               progress=False)
    jax.tree.map(np.testing.assert_array_equal, params, tiny_params)


def test_quantizing_at_load_matches_quantizing_the_float_weights(tmp_path, tiny_cfg,
                                                                 tiny_params):
    cfg = dataclasses.replace(tiny_cfg, quant="int8")
    params = pipeline.assemble(NpzSource(save_npz(tmp_path / "t.npz", tiny_params)), cfg,
                               progress=False)
    assert isinstance(params["layers"]["w_up"], QArray)
    expected = quantize(np.asarray(tiny_params["layers"]["w_up"][1]), "int8", axis=-2)
    np.testing.assert_array_equal(params["layers"]["w_up"].values[1], expected.values)
    np.testing.assert_allclose(params["layers"]["w_up"].scales[1], expected.scales, rtol=1e-6)


def test_a_missing_layer_is_named_before_any_data_is_read(tmp_path, tiny_cfg, tiny_params):
    file = save_npz(tmp_path / "t.npz", tiny_params, skip={"layers.wk.1"})
    with pytest.raises(CheckpointError, match=r"tiny.npz: missing tensors .*layers\.wk\.1$"):
        pipeline.assemble(NpzSource(file), tiny_cfg, progress=False)


def test_an_unknown_tensor_is_named(tmp_path, tiny_cfg, tiny_params):
    file = save_npz(tmp_path / "t.npz", tiny_params, extra={"layers.wz.0": np.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'layers\.wz\.0' for this "
                                              r"llama config \(2 layers\)"):
        pipeline.assemble(NpzSource(file), tiny_cfg, progress=False)


def test_a_layer_past_the_config_is_an_unexpected_tensor(tmp_path, tiny_cfg, tiny_params):
    file = save_npz(tmp_path / "t.npz", tiny_params, extra={"layers.wq.2": np.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'layers\.wq\.2'"):
        pipeline.assemble(NpzSource(file), tiny_cfg, progress=False)


def test_a_wrong_shape_names_the_tensor_both_shapes_and_the_config(tmp_path, tiny_cfg,
                                                                   tiny_params):
    file = save_npz(tmp_path / "t.npz", tiny_params, extra={"final_norm": np.zeros(65)})
    with pytest.raises(CheckpointError, match=r"tensor 'final_norm' has shape \(65,\); the "
                                              r"test config implies \(64,\) \(embed_dim=64"):
        pipeline.assemble(NpzSource(file), tiny_cfg, progress=False)


def test_every_family_in_the_quirks_table_is_a_model_family():
    assert set(FAMILIES) == set(MODEL_FAMILIES)


# -- GGUF: the header walker, the dequantization, the vocabulary cache ----------------------


@pytest.fixture(scope="module")
def q4_1_gguf(tmp_path_factory):
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_hf_llama(),
                            Q.Q4_1)


def test_gguf_header_walker_reads_what_the_gguf_package_reads(smollm2_path):
    ours, theirs = gguf_loader.open_gguf(smollm2_path), gguf.GGUFReader(smollm2_path)
    assert ours.fields.keys() == {k for k in theirs.fields if not k.startswith("GGUF.")}
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            assert ours.fields[key] == field.contents(), key
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type, a.shape, a.data_offset) == (
            b.name, b.tensor_type, tuple(b.shape.tolist()), b.data_offset)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
    np.testing.assert_array_equal(ours.tensors[-1].data, theirs.tensors[-1].data)


@pytest.mark.parametrize("kind", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda k: k.name)
def test_fast_block_dequantization_equals_the_gguf_package(tmp_path, kind):
    reader = gguf_loader.open_gguf(write_llama_gguf(tmp_path / "t.gguf", tiny_hf_llama(), kind))
    tensors = [t for t in reader.tensors if t.tensor_type == kind]
    assert tensors
    for t in tensors:
        np.testing.assert_array_equal(gguf_loader.dequantize(reader, t),
                                      gguf.quants.dequantize(t.data, kind))


def _same_tokenizer(a, b) -> None:
    text = "Hello, world! 12345 <|endoftext|> ünïcödé\n\tdef f(x): return x"
    assert a.encode(text) == b.encode(text)
    assert (a.bos_id, a.eos_id, a.pad_id, a.add_bos, a.chat_template, a.stop_ids) == (
        b.bos_id, b.eos_id, b.pad_id, b.add_bos, b.chat_template, b.stop_ids)


def test_tokenizer_cache_is_written_once_and_read_back_the_same(tmp_path, smollm2_path):
    reader = gguf_loader.open_gguf(smollm2_path)
    built = gguf_vocab.tokenizer(reader, cache=tmp_path)
    entries = list(tmp_path.iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".json"  # no temporary file left
    stamp = entries[0].stat().st_mtime_ns
    cached = gguf_vocab.tokenizer(reader, cache=tmp_path)
    assert entries[0].stat().st_mtime_ns == stamp  # read, not rewritten
    _same_tokenizer(cached, built)
    _same_tokenizer(cached, gguf_vocab.build(gguf.GGUFReader(smollm2_path)))


def test_a_corrupt_tokenizer_cache_entry_is_rebuilt(tmp_path, q4_1_gguf):
    reader = gguf_loader.open_gguf(q4_1_gguf)
    built = gguf_vocab.tokenizer(reader, cache=tmp_path)
    (entry,) = tmp_path.iterdir()
    entry.write_text('{"backend": "not json')
    _same_tokenizer(gguf_vocab.tokenizer(reader, cache=tmp_path), built)
    assert entry.read_text().startswith('{"backend": "{')  # rewritten whole


def test_tokenizer_cache_keys_on_the_metadata_not_the_path(tmp_path, q4_1_gguf):
    other = tmp_path / "other.gguf"
    other.write_bytes(q4_1_gguf.read_bytes())
    gguf_vocab.tokenizer(gguf_loader.open_gguf(q4_1_gguf), cache=tmp_path / "c")
    gguf_vocab.tokenizer(gguf_loader.open_gguf(other), cache=tmp_path / "c")
    assert len(list((tmp_path / "c").iterdir())) == 1


def test_load_gguf_returns_a_model_with_its_tokenizer(tmp_path, q4_1_gguf):
    model = gguf_loader.load_gguf(q4_1_gguf, progress=False, tokenizer_cache=tmp_path)
    assert model.tokenizer is not None and model.config.vocab_size == model.tokenizer.vocab_size
    assert model.params["layers"]["wq"].shape == (model.config.n_layers, 64, 4, 16)


# -- load_model: work beside the weights' load --------------------------------------------


def test_while_loading_runs_beside_the_weights_with_the_returned_config(monkeypatch,
                                                                        q4_1_gguf):
    import threading

    import jaxinfer
    from jaxinfer import runtime
    from jaxinfer.api import weight_shapes

    assembling, seen = threading.Event(), {}
    assemble = pipeline.assemble

    def watched_assemble(*args, **kwargs):
        assembling.set()
        return assemble(*args, **kwargs)

    def work(cfg, tokenizer):  # returns only once the weights are being read
        seen.update(cfg=cfg, tokenizer=tokenizer, beside=assembling.wait(timeout=60),
                    thread=threading.current_thread())
        seen["shapes"] = weight_shapes(cfg)

    monkeypatch.setattr(pipeline, "assemble", watched_assemble)
    model = jaxinfer.load_model(str(q4_1_gguf), attention="xla", progress=False,
                                while_loading=work)
    assert seen["beside"] and seen["thread"] is not threading.main_thread()
    assert seen["cfg"] == model.config and seen["tokenizer"] is model.tokenizer
    assert runtime.signature(seen["shapes"]) == runtime.signature(model.params)


def test_while_loading_errors_are_raised_by_load_model(q4_1_gguf):
    import jaxinfer

    def work(cfg, tokenizer):
        raise ValueError("prompt too long")

    with pytest.raises(ValueError, match="prompt too long"):
        jaxinfer.load_model(str(q4_1_gguf), progress=False, while_loading=work)


def test_quantized_weights_have_no_shapes_before_the_file_is_read(tiny_cfg):
    from jaxinfer.api import weight_shapes

    assert weight_shapes(dataclasses.replace(tiny_cfg, quant="gguf")) is None
    assert jax.tree.structure(weight_shapes(tiny_cfg)) is not None
