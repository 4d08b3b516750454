"""Convert a checkpoint to Orbax once, so later runs restore it straight onto any mesh:

    python -m jaxinfer.launch.convert --model=smollm2-135m-instruct --output=/ckpt/smollm2 \
        [--dtype=bfloat16] [--mesh=model:8]

The weights stream from the source onto their shardings (`--mesh`) and Orbax writes each
device's slices; the config and tokenizer files go beside them.
"""

from __future__ import annotations

import sys

from absl import app, flags
from absl import logging as absl_logging

from jaxinfer.launch import distributed

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Known model name, .gguf path or model directory.")
flags.DEFINE_string("output", None, "Directory to write the Orbax checkpoint to.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                  "dtype the weights are stored in.")
flags.DEFINE_boolean("overwrite", False, "Replace an existing checkpoint at --output.")
flags.mark_flags_as_required(["model", "output"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # quiet jax's backend probing
    try:
        mesh = distributed.setup()
        import jaxinfer
        from jaxinfer.checkpoints import orbax

        model = jaxinfer.load_model(FLAGS.model, dtype=FLAGS.dtype, mesh=mesh, progress=True)
        path = orbax.save(FLAGS.output, model.config, model.params, model.tokenizer,
                          overwrite=FLAGS.overwrite)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {path} ({model.config.architecture}, {FLAGS.dtype}); load it with "
          f"--model={path}")


if __name__ == "__main__":
    app.run(main)
