"""Generate text with a model: `python -m jaxinfer.launch.generate --prompt="..."`.

With no flags it answers the preset's question with the default model, as a chat.
Flags left unset take their values from the preset (`--preset`, a file in configs/).
Only the answer goes to stdout, so it can be piped; progress, timings and errors go to stderr.
"""

from __future__ import annotations

import contextlib
import sys
import time

from absl import app, flags

from jaxinfer.launch import distributed, presets

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "smollm2_135m", "Preset in configs/ (name or .toml path).")
flags.DEFINE_string("model", None, "Known model name, .gguf file, Hugging Face model directory "
                    "or hub id, or an Orbax checkpoint directory.")
flags.DEFINE_string("prompt", None, "Prompt text.")
flags.DEFINE_boolean("chat", None, "Wrap the prompt in the model's chat template.")
flags.DEFINE_integer("max_new_tokens", None, "Most tokens to generate.")
flags.DEFINE_float("temperature", None, "0 is greedy.")
flags.DEFINE_float("top_p", None, "Nucleus sampling mass (1 turns it off).")
flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens (0 turns it off).")
flags.DEFINE_integer("seed", None, "Sampling seed.")
flags.DEFINE_enum("dtype", None, ["auto", "float32", "bfloat16"], "Weight and activation dtype.")
flags.DEFINE_enum("attention", "auto", ["auto", "xla", "pallas"],
                  "Attention: Pallas kernels (GPU/TPU; interpreted, slowly, on CPU), the XLA "
                  "reference, or auto (Pallas on GPU/TPU, XLA on CPU).")
presets.define_weight_flags()  # --quant, --kv_quant, --cpu_kernels
presets.define_speculative_flags()
presets.define_startup_flags()  # --compile_while_loading
flags.DEFINE_integer("prefill_chunk", 512, "Prompts longer than this many tokens are "
                     "prefilled this many at a time (chunked prefill), up to the model's "
                     "whole context.", lower_bound=1)
flags.DEFINE_boolean("eager", False, "Run without compiling (jax.disable_jit): every operation "
                     "one by one, for stepping through the model in a debugger. Slow.")

SETTINGS = ("model", "prompt", "chat", "max_new_tokens", "temperature", "top_p", "top_k",
            "seed", "dtype")


def settings() -> dict:
    """Preset values, overridden by every flag given on the command line."""
    return presets.settings(SETTINGS)


def preset_mesh() -> str | None:
    """The preset's `mesh` field ("data:2,model:4"), if it has one."""
    from jaxinfer.config import load_preset

    return load_preset(FLAGS.preset).get("mesh")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import gc
    import logging

    from absl import logging as absl_logging

    import jaxinfer
    from jaxinfer.api import chat_tokens, weight_shapes
    from jaxinfer.generate import precompile

    # The modules (and below, the model and programs) live until exit: out of the collector's
    # sight, each full collection and the one at exit skip them (0.8-1 s of a 4.5 s run).
    gc.freeze()

    absl_logging.set_verbosity(absl_logging.WARNING)  # quiet jax's backend probing
    logging.getLogger("jaxinfer").setLevel(logging.INFO)  # progress of compiling
    opts = settings()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # load and compile progress: not the answer
            sampling = jaxinfer.SamplingParams(
                temperature=opts["temperature"], top_k=opts["top_k"], top_p=opts["top_p"],
                seed=opts["seed"],
            )
            mesh = distributed.setup(preset_mesh())  # --mesh (or the preset's) and multi-host flags
            decoding = dict(speculative_method=FLAGS.speculative_method,
                            num_speculative_tokens=FLAGS.num_speculative_tokens,
                            prefill_chunk=FLAGS.prefill_chunk)
            early_compile = []  # seconds compiling while the weights loaded

            def precompile_prompt(cfg, tokenizer) -> None:
                shapes = weight_shapes(cfg)  # None: quantized, the file decides the shapes
                if shapes is None or mesh is not None or FLAGS.eager:
                    return
                prompt = (chat_tokens(tokenizer, opts["prompt"]) if opts["chat"]
                          else tokenizer.encode(opts["prompt"]))
                early_compile.append(precompile(
                    shapes, [prompt], cfg, max_new_tokens=opts["max_new_tokens"],
                    sampling=sampling, stop_token_ids=tokenizer.stop_ids, progress=True,
                    **decoding))

            start = time.perf_counter()
            model = jaxinfer.load_model(
                opts["model"], dtype=opts["dtype"], attention=FLAGS.attention, mesh=mesh,
                quant=presets.optional("quant"), kv_quant=presets.optional("kv_quant"),
                cpu_kernels=FLAGS.cpu_kernels, batch_invariant=FLAGS.batch_invariant,
                draft=FLAGS.speculative_model, progress=True,
                while_loading=precompile_prompt if presets.compile_while_loading() else None,
            )
            load_s = time.perf_counter() - start
            if opts["chat"]:
                text, result = jaxinfer.chat(
                    model, opts["prompt"], max_new_tokens=opts["max_new_tokens"], sampling=sampling,
                    eager=FLAGS.eager, **decoding,
                )
            else:
                tokens = model.tokenizer.encode(opts["prompt"])
                result = jaxinfer.generate(
                    model.params, [tokens], model.config, max_new_tokens=opts["max_new_tokens"],
                    sampling=sampling, stop_token_ids=model.tokenizer.stop_ids, eager=FLAGS.eager,
                    **decoding,
                )
                text = model.tokenizer.decode(result.tokens[0])
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

    print(text)
    t = result.timings
    n = result.lengths[0]
    quant = presets.optional("quant")
    weights = f", {quant} weights" if quant else ""
    decode_rate = (n - 1) / t["decode"] if n > 1 and t["decode"] > 0 else float("nan")
    load = (f"load {load_s:.1f}s with compile {early_compile[0]:.1f}s beside it" if early_compile
            else f"load {load_s:.1f}s, compile {t['compile']:.1f}s")
    print(
        f"\n[{n} tokens, finish: {result.finish_reasons[0]}] {load}, "
        f"prefill {t['prefill'] * 1e3:.0f}ms "
        f"({result.prompt_lengths[0]} prompt tokens), decode {decode_rate:.1f} tok/s "
        f"({model.config.compute_dtype}{weights})",
        file=sys.stderr,
    )
    gc.freeze()
    if FLAGS.speculative_method != "none":
        print(f"[speculative {FLAGS.speculative_method}: {result.decode_steps} model calls after "
              f"the prefill, {result.accepted_tokens[0]} of {result.draft_tokens[0]} drafted "
              f"tokens accepted]", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
