"""Writes tiny tokenizer-only GGUFs with a sentencepiece-style vocabulary, laid out as llama.cpp's
converter writes Llama 2 / Mistral ones: <unk>, <s>, </s>, the 256 "<0xXX>" byte tokens, then
word pieces spelled with "▁" for a space, each with a score (higher merges first)."""

from __future__ import annotations

from pathlib import Path

import gguf

NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6

WORDS = [
    "the", "a", "an", "hello", "world", "quick", "brown", "fox", "jumps", "over", "lazy",
    "dog", "is", "it", "in", "on", "and", "to", "of", "token", "text", "new", "line",
]  # fmt: skip
SUFFIXES = ["ing", "ed", "er", "s"]
CHARACTERS = "abcdefghijklmnopqrstuvwxyzTHI.,!?'[]/"


def word_pieces() -> list[str]:
    """Single characters, then every prefix of "▁word" and of each suffix, shortest first, so
    each piece is some shorter piece plus one character."""
    pieces = ["▁", *CHARACTERS]
    longer = {
        word[:n] for word in ["▁" + w for w in WORDS] + SUFFIXES for n in range(2, len(word) + 1)
    }
    pieces += sorted(longer - set(pieces), key=lambda p: (len(p), p))
    return [*pieces, "▁▁"]  # as in Llama 2: a run of spaces is merged last


def vocabulary() -> list[tuple[str, int, float]]:
    """(token, token_type, score) in id order."""
    entries = [("<unk>", UNKNOWN, 0.0), ("<s>", CONTROL, 0.0), ("</s>", CONTROL, 0.0)]
    entries += [(f"<0x{b:02X}>", BYTE, 0.0) for b in range(256)]
    entries += [("[INST]", CONTROL, 0.0), ("[/INST]", CONTROL, 0.0)]
    entries += [(piece, NORMAL, -float(i)) for i, piece in enumerate(word_pieces())]
    return entries


def write_spm_gguf(
    path: Path,
    *,
    arch: str = "llama",
    merges: list[str] | None = None,
    add_bos: bool | None = None,
    add_space_prefix: bool | None = None,
) -> Path:
    """A tokenizer-only GGUF; without `merges` readers derive them from the scores."""
    entries = vocabulary()
    writer = gguf.GGUFWriter(path, arch=arch)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([token for token, _, _ in entries])
    writer.add_token_types([kind for _, kind, _ in entries])
    writer.add_token_scores([score for _, _, score in entries])
    if merges is not None:
        writer.add_token_merges(merges)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
