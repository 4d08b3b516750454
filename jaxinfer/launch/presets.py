"""Launcher settings: a preset in configs/ (`--preset`) overridden by flags on the command line."""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import app, flags


def settings(names: Sequence[str]) -> dict:
    """The preset's value of each of `names`, replaced by every such flag that was given.

    A name neither the preset nor a flag sets is a usage error naming it.
    """
    from jaxinfer.config import load_preset

    values_of_flags = flags.FLAGS
    preset = load_preset(values_of_flags.preset)
    values = {name: preset.get(name) for name in names}
    values.update({name: values_of_flags[name].value for name in names
                   if values_of_flags[name].value is not None})
    if missing := [name for name, value in values.items() if value is None]:
        raise app.UsageError(f"no value for {', '.join(missing)}: set it in the preset or a flag")
    return values


def define_weight_flags() -> None:
    """The weight and KV-cache format flags the generate and serve launchers share."""
    flags.DEFINE_enum("quant", None, ["none", "int8", "int4", "gguf"],
                      "Weights: float (none), quantized at load (int8 per channel, int4 in "
                      "groups of 32), or a GGUF file's own Q8_0/Q4_0/Q4_1/Q4_K blocks (gguf). "
                      "Unset: the preset's, else none.")
    flags.DEFINE_enum("kv_quant", None, ["none", "int8"],
                      "KV cache in the compute dtype (none) or int8 (per-token, per-head "
                      "scales).")
    flags.DEFINE_enum("cpu_kernels", "int8", ["int8", "f32", "off"],
                      "Quantized products on CPU: jaxinfer's kernels with activations quantized "
                      "per block of 32 (int8, as llama.cpp) or in fp32 (f32), or XLA's own "
                      "(off).")
    flags.DEFINE_bool("batch_invariant", False,
                      "On CPU, a request's logits bitwise the same alone or in any batch: "
                      "every product and attention call on the CPU kernels, prefill included "
                      "(slower prefill; needs quantized weights).")


def define_speculative_flags() -> None:
    """The speculative decoding flags the generate and serve launchers share (vLLM's names)."""
    flags.DEFINE_enum("speculative_method", "none", ["none", "ngram", "draft"],
                      "Speculative decoding: off (none), drafts looked up in the prompt and "
                      "output so far (ngram, prompt lookup), or proposed by draft heads "
                      "(draft: --speculative_model), verified several per model call.")
    flags.DEFINE_integer("num_speculative_tokens", 4, "Speculative decoding: tokens drafted "
                         "per request and step (1..7; with draft heads, at most their number).")
    flags.DEFINE_string("speculative_model", None, "Draft heads distilled for the model "
                        "(python -m jaxinfer.launch.distill --output=PATH), for "
                        "--speculative_method=draft.")


def optional(name: str) -> str | None:
    """A setting a preset may leave out: the flag if given, else the preset's value; "none"
    (or neither) -> None. For the weight and KV-cache formats (`quant`, `kv_quant`)."""
    from jaxinfer.config import load_preset

    value = flags.FLAGS[name].value or load_preset(flags.FLAGS.preset).get(name, "none")
    return None if value == "none" else value


def define_startup_flags() -> None:
    """The start-up flag the generate and serve launchers share."""
    flags.DEFINE_enum("compile_while_loading", "auto", ["auto", "true", "false"],
                      "Compile the programs on the weights' shapes while the weights load "
                      "(float weights on one device). auto: when a core is idle (the 1-minute "
                      "load average under the cores less one): on 2 busy cores the two "
                      "compete and start-up is slower than one after the other.")


def compile_while_loading() -> bool:
    """--compile_while_loading, with `auto` decided by the load on this machine's cores."""
    choice = flags.FLAGS.compile_while_loading
    if flags.FLAGS.speculative_method == "draft":  # the programs take the heads' weights too
        return False
    if choice != "auto":
        return choice == "true"
    return os.getloadavg()[0] < (os.cpu_count() or 1) - 1
