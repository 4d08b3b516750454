"""Text <-> token ids, chat templates and streaming detokenization.

The BPE itself is Hugging Face `tokenizers`; this module only configures it from a GGUF file's
metadata (the way llama.cpp reads it) or from a `tokenizer.json`. GGUF vocabularies may be
byte-level (`tokenizer.ggml.model` "gpt2": Llama 3, Qwen, SmolLM) or sentencepiece-style ("llama":
Llama 2, Mistral, TinyLlama, CodeLlama).

    tok = Tokenizer.from_gguf("model.gguf")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode(prompt)
    stream = IncrementalDetokenizer(tok)
    text = "".join(stream.add(t) for t in generated_ids) + stream.flush()
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
import jinja2
import tokenizers
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

# gguf `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
_UNKNOWN = 2
_CONTROL = 3
_USER_DEFINED = 4
# How `tokenizers`' ByteFallback decoder recognises a byte token.
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

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

# Token texts llama.cpp treats as end of generation wherever they are in the vocabulary.
_END_OF_GENERATION_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
)


class Tokenizer:
    """A BPE tokenizer plus the special ids and chat template a model ships with."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        extra_stop_ids: Sequence[int] = (),
    ) -> None:
        if add_bos and bos_id is None:
            raise ValueError("add_bos is set but the tokenizer has no BOS token")
        self._backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        named_stops = (backend.token_to_id(text) for text in _END_OF_GENERATION_TEXTS)
        stops = {eos_id, *extra_stop_ids, *named_stops} - {None}
        self.stop_ids: tuple[int, ...] = tuple(sorted(stops))
        # Ids the ByteFallback decoder reads as one raw byte ("<0x41>"), and special ids.
        self._byte_ids = frozenset(
            i for token, i in backend.get_vocab().items() if _BYTE_TOKEN.fullmatch(token)
        )
        self._special_ids = frozenset(
            i for i, token in backend.get_added_tokens_decoder().items() if token.special
        )

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path_or_reader: str | os.PathLike[str] | gguf.GGUFReader) -> Tokenizer:
        """The tokenizer a GGUF file describes; pass the loader's reader to parse the file once."""
        if isinstance(path_or_reader, gguf.GGUFReader):
            reader = path_or_reader
            source = str(getattr(reader.data, "filename", None) or "<GGUFReader>")
        else:
            reader = gguf.GGUFReader(path_or_reader)
            source = os.fspath(path_or_reader)

        def field(key: str, default: Any = None) -> Any:
            value = reader.fields.get(key)
            return default if value is None else value.contents()

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
        return cls(
            backend,
            bos_id=bos_id,
            eos_id=field("tokenizer.ggml.eos_token_id"),
            pad_id=field("tokenizer.ggml.padding_token_id"),
            add_bos=bool(field("tokenizer.ggml.add_bos_token", add_bos_default)),
            chat_template=field("tokenizer.chat_template"),
            extra_stop_ids=[i for i in extra_stops if i is not None],
        )

    @classmethod
    def from_file(
        cls,
        tokenizer_json_path: str | os.PathLike[str],
        tokenizer_config_json_path: str | os.PathLike[str] | None = None,
        extra_stop_ids: Sequence[int] = (),
    ) -> Tokenizer:
        """Load a Hugging Face `tokenizer.json`, with chat template and BOS/EOS from its config;
        `extra_stop_ids` (e.g. generation_config.json's eos_token_id) also end generation."""
        backend = tokenizers.Tokenizer.from_file(os.fspath(tokenizer_json_path))
        config: dict[str, Any] = {}
        chat_template = None
        if tokenizer_config_json_path is not None:
            config_path = Path(tokenizer_config_json_path)
            config = json.loads(config_path.read_text(encoding="utf-8"))
            chat_template = config.get("chat_template")
            if isinstance(chat_template, list):  # named templates: [{"name", "template"}, ...]
                named = {t["name"]: t["template"] for t in chat_template}
                chat_template = named.get("default")
            jinja_file = config_path.with_name("chat_template.jinja")
            if chat_template is None and jinja_file.is_file():
                chat_template = jinja_file.read_text(encoding="utf-8")

        def token_id(key: str) -> int | None:
            token = config.get(key)
            if isinstance(token, dict):  # a serialized AddedToken
                token = token.get("content")
            return None if token is None else backend.token_to_id(token)

        bos_id = token_id("bos_token")
        # Without a flag, add BOS when the file's own post-processor would.
        adds_bos = bos_id is not None and backend.encode("").ids[:1] == [bos_id]
        return cls(
            backend,
            bos_id=bos_id,
            eos_id=token_id("eos_token"),
            pad_id=token_id("pad_token"),
            add_bos=bool(config.get("add_bos_token", adds_bos)),
            chat_template=chat_template,
            extra_stop_ids=extra_stop_ids,
        )

    # -- encoding -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_text(self, token_id: int) -> str | None:
        """The vocabulary entry for `token_id` as the file spells it, or None if out of range."""
        return self._backend.id_to_token(token_id)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids for `text`; special-token text such as "<|im_start|>" maps to its one id."""
        # encode_batch lets go of the GIL while it runs (encode holds it): a long text tokenized
        # on a worker thread then leaves the server's event loop free.
        ids = self._backend.encode_batch([text], add_special_tokens=False)[0].ids
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for `ids`; bytes that do not form valid UTF-8 come out as U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **template_vars: Any,
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) into a prompt string.

        Renders as transformers' `apply_chat_template(..., tokenize=False)` does; `template_vars`
        are passed to the template (e.g. `enable_thinking=False`).
        """
        if self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template (no tokenizer.chat_template in the GGUF, "
                "no chat_template in tokenizer_config.json); format the prompt yourself and "
                "use encode()"
            )
        _check_messages(messages)
        token = self._backend.id_to_token
        return _compile_chat_template(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            bos_token=token(self.bos_id) if self.bos_id is not None else "",
            eos_token=token(self.eos_id) if self.eos_id is not None else "",
            pad_token=token(self.pad_id) if self.pad_id is not None else None,
            **template_vars,
        )


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


def _check_messages(messages: object) -> None:
    form = "a non-empty list of {'role': str, 'content': str} dicts"
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be {form}; got {messages!r}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict; got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(
                    f"messages[{i}] needs a string {key!r}; got {message.get(key)!r} in {message!r}"
                )


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training; render it."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' override: jinja's own tojson escapes HTML characters.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile once per template, in the sandbox and with the helpers transformers gives templates.

    Templates come with downloaded model files: they are untrusted code.
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, never splitting a UTF-8 character.

    Keeps two offsets into the ids seen so far, as vLLM and TGI do: text up to `read_offset` has
    been returned; decoding restarts at `prefix_offset` so each step decodes only a short window.
    A window whose text ends in U+FFFD ends inside a character and is held back for more tokens.
    So is a window ending in a byte token ("<0x0A>") or a skipped special token: ByteFallback
    decodes a run of byte tokens as a whole, all U+FFFD if any byte is invalid UTF-8.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one id; return the text it completes ("" while a character is unfinished)."""
        self._ids.append(token_id)
        tokenizer = self._tokenizer
        skipped = self._skip_special_tokens and token_id in tokenizer._special_ids
        if token_id in tokenizer._byte_ids or skipped:
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """Return whatever is held back (U+FFFD for bytes that never formed a character)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix_text) :]
