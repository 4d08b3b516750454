"""Structured output through llguidance: a grammar per request, a token bitmask per step.

A request's constraint (a JSON schema, any JSON object, a regex, a choice of strings, or a
Lark grammar) becomes an llguidance grammar and one `LLMatcher` per choice. Before each
decode call the scheduler asks every constrained request's matcher for its next-token mask,
`[ceil(vocab / 32)]` int32 words (bit t % 32 of word t // 32 allows token t), stacks them
into the `[rows, words]` bitmask the compiled sampler unpacks (free rows: all bits set, so
their logits stay bitwise the same), and feeds each sampled token back to its matcher.

llguidance builds no automaton up front (its masks come from an Earley parser over a token
trie, ~1 ms a token here), so a new schema costs nothing to start; the price is that a mask
exists for one token at a time, so the engine runs one step per call while a constrained
request runs (see Scheduler._decode).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any

import llguidance
import llguidance.numpy as llnumpy
import numpy as np

# Compact JSON: with whitespace allowed a small model can pad output with newlines forever.
_JSON_OPTIONS = {"whitespace_flexible": False}
_tokenizers: dict[int, llguidance.LLTokenizer] = {}
_lock = threading.Lock()
_executor: llguidance.LLExecutor | None = None


class ConstraintError(ValueError):
    """A constraint llguidance refuses; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class Constraint:
    """What a request constrains its output to: `kind` is one of json_schema, json_object,
    regex, choice, grammar; `spec` the schema (a dict), regex, list of strings or grammar."""

    kind: str
    spec: Any

    def grammar(self) -> str:
        """The llguidance grammar (serialized) of this constraint."""
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.spec,
                                                                 defaults=_JSON_OPTIONS)
        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                                 defaults=_JSON_OPTIONS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "choice":  # Lark string literals are JSON strings
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in self.spec))
        if self.kind == "grammar":
            return llguidance.LLMatcher.grammar_from_lark(self.spec)
        raise ConstraintError(f"unknown constraint kind {self.kind!r}")


def ll_tokenizer(tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of a jaxinfer Tokenizer (built once per tokenizer: about a second)."""
    with _lock:
        key = id(tokenizer)
        if key not in _tokenizers:
            _tokenizers[key] = llguidance.LLTokenizer(
                tokenizer._backend.to_str(), n_vocab=vocab_size,
                eos_token=list(tokenizer.stop_ids))
        return _tokenizers[key]


def words(vocab_size: int) -> int:
    """int32 words of one row's bitmask."""
    return (vocab_size + 31) // 32


def matcher(constraint: Constraint, tokenizer, vocab_size: int) -> llguidance.LLMatcher:
    """A fresh matcher at the start of the constrained output; raises ConstraintError."""
    ll = ll_tokenizer(tokenizer, vocab_size)
    try:
        grammar = constraint.grammar()
    except ValueError as e:
        raise ConstraintError(str(e)) from None
    problem = llguidance.LLMatcher.validate_grammar(grammar, ll)
    if problem:
        raise ConstraintError(problem)
    found = llguidance.LLMatcher(ll, grammar, log_level=0)
    if found.is_error():
        raise ConstraintError(found.get_error())
    return found


def next_token_mask(found: llguidance.LLMatcher, vocab_size: int) -> np.ndarray:
    """[words] int32: the tokens `found` allows next."""
    mask = np.zeros((1, words(vocab_size)), np.int32)
    llnumpy.fill_next_token_bitmask(found, mask)
    return mask[0]


def fill_masks(rows: list[tuple[llguidance.LLMatcher, int]], bitmask: np.ndarray) -> None:
    """Writes each (matcher, row)'s next-token mask into row `row` of `bitmask` [rows, words]
    (int32, C-contiguous), the matchers in parallel on llguidance's thread pool."""
    global _executor
    if not rows:
        return  # llguidance refuses an empty batch
    with _lock:
        if _executor is None:
            _executor = llguidance.LLExecutor()
    llnumpy.fill_next_token_bitmask_par(_executor, rows, bitmask)


def allows(mask: np.ndarray, token: int) -> bool:
    return bool((int(mask[token // 32]) >> (token % 32)) & 1)
