"""Convert a checkpoint to Orbax once, so later runs restore it straight onto any mesh:

    python -m jaxinfer.launch.convert --model=smollm2-135m-instruct --output=/ckpt/smollm2 \
        [--dtype=bfloat16] [--mesh=model:8] [--quant=int8|int4|gguf [--quant_method=static
        --calibration_file=text.txt]]

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
flags.DEFINE_enum("quant", None, ["int8", "int4", "gguf"],
                  "Save quantized weights: int8 (per channel), int4 (groups of 32), or a GGUF "
                  "file's own blocks (gguf). Unset: float weights.")
flags.DEFINE_enum("quant_method", "dynamic", ["dynamic", "static"],
                  "dynamic: scales from the weights; static: clip ratios calibrated on the "
                  "activations of --calibration_file.")
flags.DEFINE_string("calibration_file", None, "UTF-8 text for --quant_method=static.")
flags.DEFINE_integer("calibration_sequences", 8, "How many 256-token pieces of the text to use.")
flags.mark_flags_as_required(["model", "output"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # quiet jax's backend probing
    try:
        mesh = distributed.setup()
        import jaxinfer
        from jaxinfer.checkpoints import orbax

        if FLAGS.quant_method == "static":
            model = jaxinfer.load_model(FLAGS.model, dtype=FLAGS.dtype, mesh=mesh, progress=True)
            model = model._replace(**_calibrated(model))
        else:
            model = jaxinfer.load_model(FLAGS.model, dtype=FLAGS.dtype, mesh=mesh,
                                        quant=FLAGS.quant, progress=True)
        path = orbax.save(FLAGS.output, model.config, model.params, model.tokenizer,
                          overwrite=FLAGS.overwrite)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    quant = f", {FLAGS.quant} ({FLAGS.quant_method})" if FLAGS.quant else ""
    print(f"wrote {path} ({model.config.architecture}, {FLAGS.dtype}{quant}); load it with "
          f"--model={path}")


def _calibrated(model) -> dict:
    """Config and params quantized with clip ratios calibrated on --calibration_file."""
    import dataclasses
    from pathlib import Path

    from jaxinfer.quant import Quantizer

    if FLAGS.quant not in ("int8", "int4"):
        raise ValueError("--quant_method=static needs --quant=int8 or --quant=int4")
    if not FLAGS.calibration_file:
        raise ValueError("--quant_method=static needs --calibration_file (a UTF-8 text file)")
    tokens = model.tokenizer.encode(Path(FLAGS.calibration_file).read_text(encoding="utf-8"))
    pieces = [tokens[i : i + 256] for i in range(0, len(tokens) - 1, 256)]
    pieces = [p for p in pieces if len(p) > 1][: FLAGS.calibration_sequences]
    if not pieces:
        raise ValueError(f"{FLAGS.calibration_file} has too little text to calibrate on")
    quantizer = Quantizer("static", FLAGS.quant, calibration_data=pieces, config=model.config)
    return {"config": dataclasses.replace(model.config, quant=FLAGS.quant),
            "params": quantizer.transform(model.params)}


if __name__ == "__main__":
    app.run(main)
