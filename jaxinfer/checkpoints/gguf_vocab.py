"""A GGUF file's vocabulary -> `Tokenizer`, the way llama.cpp reads it, cached once built.

GGUF vocabularies may be byte-level (`tokenizer.ggml.model` "gpt2": Llama 3, Qwen, SmolLM) or
sentencepiece-style ("llama": Llama 2, Mistral, TinyLlama, CodeLlama; Gemma 3's own variant).
Building the BPE from a 49k-token vocabulary takes a few hundred milliseconds, so `tokenizer`
keeps what it built under ~/.cache/jaxinfer/tokenizers, keyed by the checksum of the file's
metadata (the vocabulary lives there), and later loads read that back.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from jaxinfer.checkpoints import sources
from jaxinfer.tokenizer import Tokenizer

CACHE = sources.cache_dir().parent / "tokenizers"
# Bump when the conversion below changes what it builds: older cache entries then miss.
CONVERSION_VERSION = 1

# gguf `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
_UNKNOWN = 2
_CONTROL = 3
_USER_DEFINED = 4
# The pre-tokenizer regexes of llama.cpp's llm_tokenizer_bpe (llama-vocab.cpp), in the spelling
# Hugging Face tokenizer.json files use.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_byte_level(*patterns: str) -> pre_tokenizers.PreTokenizer:
    """Split with each regex in turn (llama.cpp applies a pre type's regexes one after another)."""
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
    return pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # Exactly the pre_tokenizer of SmolLM2's and StarCoder's tokenizer.json.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _llama3() -> pre_tokenizers.PreTokenizer:
    return _split_then_byte_level(_LLAMA3_SPLIT)


def _qwen2() -> pre_tokenizers.PreTokenizer:
    return _split_then_byte_level(_QWEN2_SPLIT)


def _llama_cpp_default() -> pre_tokenizers.PreTokenizer:
    # What llama.cpp falls back to for "default" or a missing `tokenizer.ggml.pre`.
    return _split_then_byte_level(
        r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"
    )


# `tokenizer.ggml.pre` -> pre-tokenizer, grouped as in llama.cpp's llama_vocab::load.
_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _llama_cpp_default,
    **dict.fromkeys(["gpt-2", "phi-2", "roberta-bpe", "mpt", "olmo", "jais"], _gpt2),
    **dict.fromkeys(
        ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"],
        _digits_then_gpt2,
    ),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"], _llama3),
    **dict.fromkeys(["qwen2", "stablelm2", "megrez"], _qwen2),
}
# llama.cpp sets ignore_merges and add_bos for these (LLAMA_VOCAB_PRE_TYPE_LLAMA3).
_LLAMA3_PRE = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3"})
_SUPPORTED_MODELS = ("gpt2", "llama")
# Sentencepiece vocabularies these architectures ship need their own handling in transformers
# (Gemma: spaces spelled as spaces, merges in file order; Phi-3: prefix space from a normalizer).
_UNSUPPORTED_SENTENCEPIECE_ARCHS = frozenset({"gemma", "gemma2", "phi3"})
_GEMMA_SENTENCEPIECE_ARCHS = frozenset({"gemma3"})  # built as transformers' GemmaTokenizer

_Field = Callable[..., Any]  # GGUF metadata lookup: field(key, default=None)


def _byte_level_bpe(field: _Field, source: str) -> tuple[tokenizers.Tokenizer, str]:
    """GPT-2-style BPE over bytes spelled as unicode, split by the `tokenizer.ggml.pre` regexes."""
    pre = field("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"{source}: tokenizer.ggml.pre is {pre!r}, which jaxinfer does not support; "
            f"supported: {sorted(_PRE_TOKENIZERS)}"
        )
    tokens: list[str] = field("tokenizer.ggml.tokens")
    merges: list[str] = field("tokenizer.ggml.merges", [])
    bpe = models.BPE(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=[tuple(merge.split(" ", 1)) for merge in merges],
        ignore_merges=pre in _LLAMA3_PRE,
    )
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    return backend, pre


def _sentencepiece_bpe(field: _Field, source: str) -> tokenizers.Tokenizer:
    """Sentencepiece-style BPE ("▁" for spaces, "<0x41>" byte fallback), as transformers' GGUF
    loader builds it (LlamaTokenizer, transformers 5.x).

    Where transformers and llama.cpp's llm_tokenizer_spm disagree we follow transformers, except
    for the file's own flags:
    - transformers' Metaspace(prepend_scheme="first") adds "▁" only at the very start, and not if
      the text already starts with a space: " hi" -> "▁hi". llama.cpp always adds one (" hi" ->
      "▁▁hi") and adds one again after every special token ("<s>hi" -> <s> "▁hi", here <s> "hi").
    - transformers ignores `tokenizer.ggml.add_space_prefix`; we honour False as llama.cpp does.
    - llama.cpp merges the adjacent pair whose result scores best, leftmost first; BPE with
      merges ranked by that score (below) agrees except where equal-scoring pairs compete.
    - With no byte token for a character transformers drops it; we give the unknown token, as
      llama.cpp does. (Real vocabularies have all 256 byte tokens, so this never shows.)
    """
    arch = field("general.architecture")
    if arch in _UNSUPPORTED_SENTENCEPIECE_ARCHS:
        raise ValueError(
            f"{source}: a sentencepiece vocabulary for architecture {arch!r} is not supported "
            f"(only Llama/Mistral-style ones); use the model's tokenizer.json with from_file()"
        )
    tokens: list[str] = field("tokenizer.ggml.tokens")
    vocab = {token: i for i, token in enumerate(tokens)}
    merges: list[str] | None = field("tokenizer.ggml.merges")
    if merges is not None:
        pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    else:
        scores: list[float] | None = field("tokenizer.ggml.scores")
        if scores is None:
            raise ValueError(
                f"{source}: sentencepiece vocabulary has neither tokenizer.ggml.merges nor "
                f"tokenizer.ggml.scores, so the merge order is unknown"
            )
        pairs = _merges_from_scores(vocab, dict(zip(tokens, scores, strict=False)))
    unk_id = field("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE(
        vocab=vocab,
        merges=pairs,
        unk_token=None if unk_id is None else tokens[unk_id],
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = tokenizers.Tokenizer(bpe)
    add_space_prefix = bool(field("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:  # drop the space the encoder added
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _gemma_bpe(field: _Field) -> tokenizers.Tokenizer:
    """Gemma's sentencepiece vocabulary as transformers' GGUF loader builds it (GemmaTokenizer):
    spaces become "▁" in a normalizer, with no prefix space, and byte fallback.

    Two quirks of Gemma files, handled as transformers does:
    - a token of two or more spaces is stored as spaces ("  ") but looked up as "▁▁";
    - the file has no merges, and its scores do not follow the merge order: the order of the
      tokens in the file does, so merges are ranked by position.
    """
    tokens: list[str] = field("tokenizer.ggml.tokens")
    respelled = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: i for i, token in enumerate(respelled)}
    merges = _merges_from_scores(vocab, {token: -i for i, token in enumerate(respelled)})
    unk_id = field("tokenizer.ggml.unknown_token_id")
    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab,
        merges=merges,
        unk_token=None if unk_id is None else respelled[unk_id],
        fuse_unk=True,
        byte_fallback=True,
    ))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best score first: transformers' generate_merges.

    Ties go to the longer left piece, then the longer right piece, then vocabulary order.
    """
    merges: list[tuple[str, str, float]] = []
    for token, score in scores.items():
        pairs = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        merges += sorted(pairs, key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    merges.sort(key=lambda pair: (pair[2], len(pair[0]), len(pair[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def build(path_or_reader: Any) -> Tokenizer:
    """The tokenizer a GGUF file describes: a path, a `gguf_file.GGUFFile`, or a
    `gguf.GGUFReader`."""
    if isinstance(path_or_reader, gguf.GGUFReader):
        reader = path_or_reader
        source = str(getattr(reader.data, "filename", None) or "<GGUFReader>")

        def field(key: str, default: Any = None) -> Any:
            value = reader.fields.get(key)
            return default if value is None else value.contents()
    else:
        if isinstance(path_or_reader, (str, os.PathLike)):
            from jaxinfer.checkpoints.gguf_file import open_gguf

            path_or_reader = open_gguf(path_or_reader)
        source, field = str(path_or_reader.path), path_or_reader.get
    model = field("tokenizer.ggml.model")
    if model not in _SUPPORTED_MODELS:
        raise ValueError(
            f"{source}: tokenizer.ggml.model is {model!r}; jaxinfer supports "
            f"{list(_SUPPORTED_MODELS)} (byte-level and sentencepiece-style BPE)"
        )
    tokens: list[str] = field("tokenizer.ggml.tokens")
    token_types: list[int] = field("tokenizer.ggml.token_type", [])
    bos_id = field("tokenizer.ggml.bos_token_id")
    if model == "gpt2":
        backend, pre = _byte_level_bpe(field, source)
        add_bos_default = pre in _LLAMA3_PRE and bos_id is not None
    elif field("general.architecture") in _GEMMA_SENTENCEPIECE_ARCHS:
        backend = _gemma_bpe(field)
        add_bos_default = True
    else:
        backend = _sentencepiece_bpe(field, source)
        add_bos_default = True  # llama.cpp and transformers both add BOS to these by default
    # Control, unknown and user-defined tokens are matched whole in the text, before any BPE.
    added = [
        AddedToken(token, special=kind != _USER_DEFINED, normalized=False)
        for token, kind in zip(tokens, token_types, strict=False)
        if kind in (_UNKNOWN, _CONTROL, _USER_DEFINED)
    ]
    if field("general.architecture") in _GEMMA_SENTENCEPIECE_ARCHS:
        # As transformers: user-defined runs of spaces were respelled "▁▁" and stay BPE.
        vocab = backend.get_vocab()
        added = [t for t in added if t.special or t.content in vocab]
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])

    extra_stops = [field("tokenizer.ggml.eot_token_id"), field("tokenizer.ggml.eom_token_id")]
    return Tokenizer(
        backend,
        bos_id=bos_id,
        eos_id=field("tokenizer.ggml.eos_token_id"),
        pad_id=field("tokenizer.ggml.padding_token_id"),
        add_bos=bool(field("tokenizer.ggml.add_bos_token", add_bos_default)),
        chat_template=field("tokenizer.chat_template"),
        extra_stop_ids=[i for i in extra_stops if i is not None],
    )


def tokenizer(reader: Any, cache: Path | None = CACHE) -> Tokenizer:
    """`build(reader)` for a `gguf_file.GGUFFile`, read back from `cache` when it was built
    before from the same metadata (None: no cache). Cache writes are atomic (a temporary file
    renamed into place), so concurrent loads never read half an entry."""
    if cache is None:
        return build(reader)
    digest = hashlib.sha256(reader.metadata_bytes)
    digest.update(f"{CONVERSION_VERSION} {tokenizers.__version__}".encode())
    entry = cache / f"{digest.hexdigest()}.json"
    try:
        saved = json.loads(entry.read_text(encoding="utf-8"))
        return Tokenizer(tokenizers.Tokenizer.from_str(saved.pop("backend")), **saved)
    except Exception:  # absent, cut short, or written by another version: build it again
        pass
    built = build(reader)
    saved = {"backend": built._backend.to_str(), "bos_id": built.bos_id,
             "eos_id": built.eos_id, "pad_id": built.pad_id, "add_bos": built.add_bos,
             "chat_template": built.chat_template, "extra_stop_ids": list(built.stop_ids)}
    temporary = cache / f"{entry.name}.{os.getpid()}.tmp"  # renamed into place when whole
    try:
        cache.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(saved), encoding="utf-8")
        temporary.replace(entry)
    except OSError:  # a read-only or full cache costs a rebuild next time, nothing else
        temporary.unlink(missing_ok=True)
    return built
