"""The benchmark's settings checked and turned into engine configurations and a Workload;
errors are ValueErrors that name the flag, what was wrong and what is allowed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from jaxinfer.bench.workload import PEERS, Workload
from jaxinfer.checkpoints import gguf_vocab

QUANTS = ("none", "int8", "int4", "gguf")
DTYPES = ("float32", "bfloat16", "auto")


def positive_ints(name: str, values: list[str]) -> tuple[int, ...]:
    """A list flag's entries as positive integers."""
    try:
        numbers = tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(f"--{name}={','.join(values)}: expected positive integers separated "
                         "by commas, e.g. 1,8,32") from None
    if not numbers or min(numbers) < 1:
        raise ValueError(f"--{name}={','.join(values)}: expected at least one value, each at "
                         "least 1")
    return numbers


def configs(quants: list[str], dtypes: list[str]) -> list[dict]:
    """The jaxinfer configurations: each quant with each dtype, unless it names its own
    ("none:bfloat16")."""
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"--dtype: unknown {dtype!r}; allowed: {', '.join(DTYPES)}")
    if not quants or not dtypes:
        raise ValueError("--quant and --dtype each need at least one entry")
    out = []
    for entry in quants:
        quant, _, own_dtype = entry.partition(":")
        if quant not in QUANTS:
            raise ValueError(f"--quant: unknown {quant!r}; allowed: {', '.join(QUANTS)}")
        if own_dtype and own_dtype not in DTYPES:
            raise ValueError(f"--quant={entry}: unknown dtype {own_dtype!r}; allowed: "
                             f"{', '.join(DTYPES)}")
        for dtype in [own_dtype] if own_dtype else dtypes:
            config = {"engine": "jaxinfer", "quant": None if quant == "none" else quant,
                      "dtype": dtype}
            if config not in out:
                out.append(config)
    return out


def peers(names: list[str], model_path: Path) -> list[dict]:
    """The peer engines, each checked to be installed and able to read the model."""
    out = []
    for name in names:
        if name not in PEERS:
            raise ValueError(f"--peers: unknown {name!r}; allowed: {', '.join(PEERS)}")
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"--peers={name} needs the {name} package, which `make bench` "
                             "installs")
        if name == "llama_cpp" and model_path.suffix != ".gguf":
            raise ValueError(f"--peers=llama_cpp needs a .gguf model; {model_path} is not one")
        out.append({"engine": name})
    return out


def workload(model_path: Path, prompt: str, prefill_tokens: list[str], batch_sizes: list[str],
             decode_tokens: int, repeats: int, threads: int) -> Workload:
    """The Workload: the prompt tokenized once, lengths checked against the model's context."""
    from jaxinfer.checkpoints import gguf
    from jaxinfer.tokenizer import Tokenizer

    prefill = positive_ints("prefill_tokens", prefill_tokens)
    batches = positive_ints("batch_sizes", batch_sizes)
    if decode_tokens < 2:
        raise ValueError(f"--decode_tokens={decode_tokens}: decode tok/s needs at least 2 new "
                         "tokens per row (the first comes from prefill)")
    if repeats < 1:
        raise ValueError(f"--repeats={repeats}: it must be at least 1")
    if model_path.suffix == ".gguf":
        reader = gguf.open_gguf(model_path)
        tokenizer = gguf_vocab.build(reader)
        context = gguf.model_config(reader).max_seq_len
    else:
        tokenizer = Tokenizer.from_file(model_path / "tokenizer.json")
        context = json.loads((model_path / "config.json").read_text()).get(
            "max_position_embeddings", 1 << 30)
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise ValueError("--prompt is empty: it needs at least one token")
    for name, tokens in (("prefill_tokens", max(prefill)),
                         ("prompt plus --decode_tokens", len(prompt_ids) + decode_tokens)):
        if tokens + 1 > context:
            raise ValueError(f"--{name}: {tokens:,} tokens (plus one generated) exceed this "
                             f"model's context of {context:,}")
    return Workload(model=str(model_path), prompt_ids=tuple(prompt_ids), prefill_tokens=prefill,
                    batch_sizes=batches, decode_tokens=decode_tokens,
                    vocab_size=tokenizer.vocab_size, threads=threads, repeats=repeats)
