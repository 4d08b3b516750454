"""Score text for jaxinfer's green-list watermark:
`python -m jaxinfer.launch.detect --text="..." --key=SECRET`.

Tokenizes with the model's tokenizer (only the tokenizer is loaded, not the weights) and
prints the z-score, the one-sided p-value and how many tokens were scored, as one JSON line
on stdout. The key is never printed; `--key=@PATH` reads it from a file, `--text=@PATH` the
text (`@-`: stdin).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct", "Known model name, .gguf file or Hugging "
                    "Face model directory whose tokenizer wrote the text.")
flags.DEFINE_string("text", None, "The text to score ('@PATH' reads a file, '@-' stdin).")
flags.DEFINE_string("key", None, "The watermark's secret ('@PATH' reads it from a file).")
flags.mark_flags_as_required(["text", "key"])


def _value(flag: str, value: str) -> str:
    """A flag's value, or the contents of the file an '@PATH' value names."""
    if not value.startswith("@"):
        return value
    if value == "@-":
        return sys.stdin.read()
    try:
        return Path(value[1:]).read_text()
    except OSError as e:
        raise app.UsageError(f"--{flag}: cannot read {value[1:]!r}: {e.strerror}") from e


def load_tokenizer(name_or_path: str):
    """The tokenizer of a GGUF file or a Hugging Face model directory."""
    from jaxinfer.checkpoints import gguf_vocab, safetensors, sources

    path = sources.resolve(name_or_path)
    tokenizer = safetensors.load_tokenizer(path) if path.is_dir() else gguf_vocab.build(path)
    if tokenizer is None:
        raise ValueError(f"{path}: no tokenizer files (tokenizer.json)")
    return tokenizer


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from jaxinfer import watermark

    text, key = _value("text", FLAGS.text), _value("key", FLAGS.key)
    if FLAGS.key.startswith("@"):
        key = key.strip()  # a key file's trailing newline is not part of the secret
    try:
        ids = load_tokenizer(FLAGS.model).encode(text, add_bos=False)
        z, p_value, scored = watermark.detect(ids, key)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"z_score": round(z, 4), "p_value": p_value, "tokens_scored": scored,
                      "tokens": len(ids), "watermarked": z > 4}))


if __name__ == "__main__":
    app.run(main)
