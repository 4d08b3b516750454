"""Text <-> token ids, chat templates and streaming detokenization.

The BPE itself is Hugging Face `tokenizers`, configured from a `tokenizer.json` here or from a
GGUF file's vocabulary by `jaxinfer.checkpoints.gguf_vocab` (the way llama.cpp reads it).

    tok = jaxinfer.checkpoints.gguf_vocab.build("model.gguf")  # or Tokenizer.from_file(...)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode(prompt)
    stream = IncrementalDetokenizer(tok)
    text = "".join(stream.add(t) for t in generated_ids) + stream.flush()
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

# How `tokenizers`' ByteFallback decoder recognises a byte token.
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

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
        tools: list[dict[str, Any]] | None = None,
        **template_vars: Any,
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) into a prompt string.

        Renders as transformers' `apply_chat_template(..., tokenize=False)` does; `tools`
        (OpenAI tool dicts) become the template's `tools` variable; `template_vars` are passed
        to the template (e.g. `enable_thinking=False`).
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
            tools=tools,
            documents=None,
            bos_token=token(self.bos_id) if self.bos_id is not None else "",
            eos_token=token(self.eos_id) if self.eos_id is not None else "",
            pad_token=token(self.pad_id) if self.pad_id is not None else None,
            **template_vars,
        )


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
