"""Distill draft heads for speculative decoding from a model's own answers:

    python -m jaxinfer.launch.distill --prompts=examples/data/distill_prompts.txt \\
        --output=/tmp/smollm2-draft

generates the model's answers to the prompts (one per line), trains the heads with optax
(jaxinfer.distill), checkpointing with Orbax as it goes, and saves them in --output for
`--speculative_method=draft --speculative_model=OUTPUT` (generate, serve) or
`load_model(..., draft=OUTPUT)`. Run again with the same --output to resume: the answers are
kept in OUTPUT/data.npz and training restarts from its latest checkpoint. It prints each
head's acceptance rate on held-out answers before and after training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

from absl import app, flags

from jaxinfer.launch import presets

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "smollm2_135m", "Preset in configs/ (name or .toml path).")
flags.DEFINE_string("model", None, "The model to draft for (as in generate; default: the "
                    "preset's). It is loaded with float weights, which training needs.")
flags.DEFINE_string("prompts", None, "A text file of prompts, one per line.", required=True)
flags.DEFINE_string("output", None, "Directory for the heads, the data and the training "
                    "checkpoints.", required=True)
flags.DEFINE_boolean("chat", True, "Send each prompt through the model's chat template.")
flags.DEFINE_integer("max_prompts", 0, "Use only the first N prompts (0: all).")
flags.DEFINE_integer("num_heads", 4, "Draft heads: tokens proposed per step (1..7).")
flags.DEFINE_integer("max_new_tokens", 128, "Tokens per generated answer.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature of the answers (0: greedy).")
flags.DEFINE_integer("steps", 600, "Optimizer steps.")
flags.DEFINE_integer("batch_size", 256, "Answer positions per optimizer step.")
flags.DEFINE_float("learning_rate", 1e-3, "AdamW peak learning rate (warmup, cosine decay).")
flags.DEFINE_integer("checkpoint_every", 100, "Steps between Orbax checkpoints.")
flags.DEFINE_integer("seed", 0, "Seeds the heads' initialization and the batches.")

DATA_FILE = "data.npz"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    from absl import logging as absl_logging

    import jaxinfer
    from jaxinfer import distill, draft_heads
    from jaxinfer.checkpoints import draft

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every checkpoint at INFO
    started = time.perf_counter()
    output = Path(FLAGS.output)
    options = distill.DistillOptions(
        num_heads=FLAGS.num_heads, max_new_tokens=FLAGS.max_new_tokens,
        temperature=FLAGS.temperature, steps=FLAGS.steps, batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate, checkpoint_every=FLAGS.checkpoint_every,
        seed=FLAGS.seed)
    texts = [line.strip() for line in Path(FLAGS.prompts).read_text().splitlines()
             if line.strip()]
    texts = texts[: FLAGS.max_prompts or None]
    if len(texts) < 10:
        raise app.UsageError(f"{FLAGS.prompts}: {len(texts)} prompts; distillation needs at "
                             "least 10 (a tenth is held out to measure acceptance)")
    model_name = FLAGS.model or presets.settings(("model",))["model"]
    with contextlib.redirect_stdout(sys.stderr):
        model = jaxinfer.load_model(model_name, dtype="float32", quant=None)
    output.mkdir(parents=True, exist_ok=True)
    if (output / DATA_FILE).is_file():
        data = distill.Dataset.load(output / DATA_FILE)
        print(f"answers from {output / DATA_FILE}: {len(data.examples)} positions",
              file=sys.stderr)
    else:
        encoded = distill.encode_prompts(model.tokenizer, texts, FLAGS.chat)
        data = distill.make_dataset(model, encoded, options, model.tokenizer.stop_ids)
        data.save(output / DATA_FILE)
    data_s = time.perf_counter() - started

    untrained = draft_heads.init(jax.random.key(options.seed), model.config.embed_dim,
                                 options.num_heads, options.hidden_dim)
    before = distill.evaluate(model, untrained, data)
    train_start = time.perf_counter()
    heads = distill.train(model, data, options, output)
    train_s = time.perf_counter() - train_start
    after = distill.evaluate(model, heads, data)
    record = {"model": model_name, "prompts": FLAGS.prompts, "answers": len(texts),
              "positions": int(len(data.examples)), "options": dataclasses.asdict(options),
              "data_seconds": round(data_s, 1), "train_seconds": round(train_s, 1),
              "acceptance_untrained": [round(float(x), 4) for x in before],
              "acceptance_trained": [round(float(x), 4) for x in after]}
    draft.save(output, heads, model.config, record)
    print(json.dumps(record, indent=2), file=sys.stderr)
    print(f"draft heads saved in {output}; use them with --speculative_method=draft "
          f"--speculative_model={output}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
