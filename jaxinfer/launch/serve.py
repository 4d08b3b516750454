"""Serve a model over an OpenAI-compatible HTTP API: `python -m jaxinfer.launch.serve`.

The port opens at once; /health answers 503 while the model loads and compiles, then 200.
SIGTERM (or Ctrl-C) stops accepting connections and lets in-flight requests finish for up to
--drain_timeout_s; requests still unfinished then end with an abort (a 503 JSON body, or a
last chunk with finish_reason "abort", an error event and `[DONE]` for a stream). With --models_file
several models share the server (and A/B routes split a name between them; see
jaxinfer.serving.router, which also serves POST /v1/admin/models/NAME/weights). The exit
status is 0 when every request in flight finished, EXIT_ABORTED (3) when some had to be cut,
and 1 when the model could not be loaded. Flags left unset take their values from the preset
(`--preset`, a file in configs/). Progress and logs go to stderr.

    python -m jaxinfer.launch.serve --port=8000 --max_batch_size=16
    python -m jaxinfer.launch.serve --models_file=deploy/models.toml --api_key=KEY
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "smollm2-135m-instruct", "prompt": "The capital of France is"}'
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from absl import app, flags

from jaxinfer.launch import distributed, presets  # distributed: --mesh, multi-host flags

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "serve_smollm2_135m", "Preset in configs/ (name or .toml path).")
flags.DEFINE_string("model", None, "Known model name or path to a .gguf file.")
flags.DEFINE_string("served_model_name", None, "Name clients pass as `model` (default: --model).")
flags.DEFINE_string("host", None, "Address to listen on.")
flags.DEFINE_integer("port", None, "Port to listen on.")
flags.DEFINE_enum("dtype", None, ["auto", "float32", "bfloat16"], "Weight and activation dtype.")
flags.DEFINE_enum("attention", None, ["auto", "xla", "pallas"], "Attention implementation.")
presets.define_weight_flags()  # --quant, --kv_quant, --cpu_kernels
flags.DEFINE_integer("max_batch_size", None, "Decode slots: requests generating at once.")
flags.DEFINE_integer("max_seq_len", None, "Most tokens per request, prompt + generated.")
flags.DEFINE_integer("page_size", None, "Tokens per KV-cache page.")
flags.DEFINE_float("kv_cache_gb", None, "Memory for the KV page pool, in GiB.")
flags.DEFINE_integer("num_pages", None, "KV pages in the pool (0: from --kv_cache_gb).")
flags.DEFINE_integer("decode_steps", None, "Decode steps per device call.")
flags.DEFINE_integer("prefill_batch_size", None, "Prompts per prefill call.")
flags.DEFINE_integer("max_queue_size", None, "Waiting requests beyond which clients get 429.")
flags.DEFINE_float("max_queue_delay_ms", None, "Hold a partial prefill batch this long.")
flags.DEFINE_integer("max_num_batched_tokens", None, "Prompt tokens per prefill call: longer "
                     "prompts are prefilled in chunks, running requests decoding between.")
flags.DEFINE_float("host_kv_cache_gb", 0.0, "Host memory (GiB) for cached KV pages evicted from "
                   "the device pool, brought back on a prefix hit (a no-op on CPU-only machines).")
flags.DEFINE_boolean("enable_prefix_caching", True, "Reuse the KV pages of cached prompt "
                     "prefixes (--noenable_prefix_caching: prefill every prompt from token 0).")
presets.define_speculative_flags()
presets.define_startup_flags()  # --compile_while_loading
flags.DEFINE_float("drain_timeout_s", None, "On SIGTERM, wait this long for requests.")
flags.DEFINE_boolean("eager", False, "Run without compiling (jax.disable_jit): every operation "
                     "one by one, for stepping through the model in a debugger. Slow.")
flags.DEFINE_string("api_key", None, "Require `Authorization: Bearer KEY` ('' = open).")
flags.DEFINE_float("max_body_mb", None, "Largest request body in MiB; larger ones get 413.")
flags.DEFINE_string("watermark_key", None, "Watermark every response with this secret (green-list "
                    "watermark, jaxinfer.watermark) unless a request asks `watermark: false`; "
                    "'@PATH' reads it from a file, keeping it out of the process list. Unset: "
                    "off (requests may not ask for it).")
flags.DEFINE_float("rate_limit_rpm", None, "Input screening: requests per minute per API key "
                   "(per client address without --api_key); more get 429 with Retry-After.")
flags.DEFINE_float("rate_limit_prompt_tpm", None, "Input screening: prompt tokens per minute "
                   "per API key (or address); more get 429 with Retry-After.")
flags.DEFINE_integer("max_prompt_tokens", None, "Input screening: longer prompts get 400.")
flags.DEFINE_multi_string("deny_pattern", [], "Input screening: a regex (Python `re`); prompts "
                          "it matches get 400 denied_pattern. Repeatable.")
flags.DEFINE_string("deny_patterns_file", None, "Input screening: a file of deny regexes, one "
                    "per line (# comments).")
flags.DEFINE_float("injection_threshold", None, "Input screening: block prompts whose "
                   "HeuristicInjectionScorer score (0 to 1) reaches this (400 prompt_injection).")
flags.DEFINE_enum("fast_quant", None, ["int8", "int4", "gguf"],
                  "Adaptive precision: hold the model twice, in float (or the --quant given on "
                  "the command line) and in this format, and route each request by its "
                  "`precision` (high: the first, fast: this one, auto: by "
                  "--auto_fast_prompt_chars / --auto_fast_load). Costs both copies' memory "
                  "(SmolLM2-135M: 538 MB float32 + 136 MB int8 or 112 MB gguf) and two KV pools.")
flags.DEFINE_integer("auto_fast_prompt_chars", 2000, "Adaptive precision: `auto` prompts of at "
                     "least this many characters go to the fast copy.")
flags.DEFINE_integer("auto_fast_load", None, "Adaptive precision: `auto` requests go to the "
                     "fast copy while the high one has this many unfinished.")
flags.DEFINE_string("models_file", None, "A TOML file of several models to serve and A/B "
                    "routes between them (deploy/models.toml shows the format); replaces "
                    "--model and --served_model_name.")

SETTINGS = ("model", "served_model_name", "host", "port", "dtype", "attention",
            "max_batch_size", "max_seq_len", "page_size", "kv_cache_gb", "num_pages",
            "decode_steps", "prefill_batch_size", "max_queue_size", "max_queue_delay_ms",
            "drain_timeout_s", "api_key", "max_body_mb", "max_num_batched_tokens")
EXIT_ABORTED = 3  # SIGTERM came with more work in flight than --drain_timeout_s allowed
log = logging.getLogger("jaxinfer.serve")


def settings() -> dict:
    """Preset values, overridden by every flag given on the command line."""
    return presets.settings(SETTINGS)


def engine_config(opts: dict):
    from jaxinfer.serving import EngineConfig

    return EngineConfig(
        max_batch_size=opts["max_batch_size"],
        max_seq_len=opts["max_seq_len"],
        page_size=opts["page_size"],
        kv_cache_gb=opts["kv_cache_gb"],
        num_pages=opts["num_pages"] or None,
        decode_steps=opts["decode_steps"],
        prefill_batch_size=opts["prefill_batch_size"],
        max_queue_size=opts["max_queue_size"],
        max_queue_delay_ms=opts["max_queue_delay_ms"],
        eager=FLAGS.eager,
        enable_prefix_caching=FLAGS.enable_prefix_caching,
        max_num_batched_tokens=opts["max_num_batched_tokens"],
        host_kv_cache_gb=FLAGS.host_kv_cache_gb,
        speculative_method=FLAGS.speculative_method,
        num_speculative_tokens=FLAGS.num_speculative_tokens,
    )


def watermark_key() -> str | None:
    """--watermark_key's secret (from the file a '@PATH' value names); never logged."""
    key = FLAGS.watermark_key
    if key is not None and key.startswith("@"):
        try:
            key = Path(key[1:]).read_text().strip()
        except OSError as e:
            raise app.UsageError(f"--watermark_key: cannot read {key[1:]!r}: {e.strerror}") from e
    if key == "":
        raise app.UsageError("--watermark_key is empty; give a secret string (or leave it unset)")
    return key


def load_and_attach(opts: dict, config, state) -> None:
    """Loads the model, compiles every serving program, then starts the engine loop."""
    mesh = distributed.setup()
    if mesh is not None:
        from jaxinfer.sharding import describe

        print(f"mesh: {describe(mesh)}", file=sys.stderr, flush=True)
    state.attach(load_and_start(opts["model"], opts, config, mesh))


def load_and_start(path: str, opts: dict, config, mesh, quant: str | None = None):
    """The engine of the model at `path`, every serving program compiled. The programs need
    only the weights' shapes: where the config decides those (float weights, one device),
    warm-up runs while the weights load if --compile_while_loading says so."""
    from jaxinfer import Model
    from jaxinfer.api import weight_shapes

    early = []

    def warm_up(cfg, tokenizer) -> None:  # on a thread of its own while the weights load
        shapes = weight_shapes(cfg)
        if shapes is not None and mesh is None:  # under a mesh, warm-up runs: real weights
            early.append(start_engine(Model(cfg, shapes, tokenizer), config, mesh,
                                      note=" while the weights load"))

    model = load_weights(path, opts, mesh, quant,
                         while_loading=warm_up if presets.compile_while_loading() else None)
    if not early:
        return start_engine(model, config, mesh)
    early[0].use_params(model.params)
    return early[0]


def load_weights(path: str, opts: dict, mesh, quant: str | None = None, while_loading=None):
    """`path` loaded as the flags say; `quant` (a models file's entry) overrides --quant.
    `while_loading`: see `jaxinfer.load_model`."""
    import jaxinfer

    if quant is None:
        quant = presets.optional("quant")
    return jaxinfer.load_model(path, dtype=opts["dtype"], attention=opts["attention"],
                               mesh=mesh, quant=None if quant == "none" else quant,
                               kv_quant=presets.optional("kv_quant"),
                               cpu_kernels=FLAGS.cpu_kernels,
                               batch_invariant=FLAGS.batch_invariant, progress=True,
                               draft=FLAGS.speculative_model
                               if FLAGS.speculative_method == "draft" else None,
                               while_loading=while_loading)


def start_engine(model, config, mesh, note: str = ""):
    """The engine of `model`, every serving program compiled (`model.params` may be the
    weights' shapes alone; see `load_and_start`)."""
    from jaxinfer.progress import line
    from jaxinfer.serving.engine import Engine

    cfg = model.config
    engine = Engine(model, config, mesh=mesh)
    line(f"KV cache: {engine.num_pages - 1} pages of {engine.page_size} tokens "
         f"({(engine.num_pages - 1) * config.page_bytes(cfg) / 2**30:.2f} GiB); "
         f"{engine.slots} slots, context {engine.context}; compiling "
         f"{len(engine.buckets)} prefill buckets and decode widths {engine.decode_widths}"
         f"{note} ...")
    start = time.perf_counter()
    if not config.eager:
        engine.warmup(progress=True)
    line(f"warm-up took {time.perf_counter() - start:.1f}s")
    return engine


def read_models_file(path: str) -> tuple[dict[str, dict], dict[str, dict[str, float]]]:
    """{name: {"path", "quant", "kv_cache_gb"}} and {routed name: {model: weight}} from a
    models file; a usage error says what is wrong."""
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise app.UsageError(f"--models_file={path}: {e}") from e
    models, routes = data.get("models", {}), data.get("routes", {})
    allowed = {"path", "quant", "kv_cache_gb"}
    for name, entry in models.items():
        if not isinstance(entry, dict) or "path" not in entry or set(entry) - allowed:
            raise app.UsageError(f"--models_file={path}: [models.{name}] needs `path` and "
                                 f"may have {sorted(allowed - {'path'})}; got {entry}")
    if not models:
        raise app.UsageError(f"--models_file={path}: no [models.NAME] tables")
    return models, routes


def screen():
    """The input screen the flags ask for, or None when they ask for none."""
    from jaxinfer.serving.screening import Screen, ScreeningConfig, read_deny_file

    patterns = list(FLAGS.deny_pattern)
    try:
        if FLAGS.deny_patterns_file:
            patterns += read_deny_file(FLAGS.deny_patterns_file)
        config = ScreeningConfig(requests_per_minute=FLAGS.rate_limit_rpm,
                                 prompt_tokens_per_minute=FLAGS.rate_limit_prompt_tpm,
                                 max_prompt_tokens=FLAGS.max_prompt_tokens,
                                 deny_patterns=tuple(patterns),
                                 injection_threshold=FLAGS.injection_threshold)
        return Screen(config) if config.enabled else None
    except (OSError, ValueError) as e:
        raise app.UsageError(f"input screening: {e}") from e


class MultiModel:
    """Loads every model of a models file (or the two copies of --fast_quant) into one Router
    (see jaxinfer.serving.router)."""

    def __init__(self, opts: dict, config, path: str | None = None):
        from jaxinfer.serving.router import Router

        self.opts, self.config = opts, config
        if path is not None:
            self.models, routes = read_models_file(path)
        else:  # --fast_quant: one model in two formats behind a precision route
            served = opts["served_model_name"] or opts["model"]
            # The high copy is float unless --quant is on the command line (not the preset's).
            high = FLAGS.quant if FLAGS["quant"].present else "none"
            self.models = {f"{served}@high": {"path": opts["model"], "quant": high},
                           f"{served}@fast": {"path": opts["model"], "quant": FLAGS.fast_quant}}
            routes = {}
        self.mesh = None
        self.router = Router(self.load_model, self.start_engine, api_key=opts["api_key"] or None,
                             max_body_bytes=int(opts["max_body_mb"] * 2**20),
                             drain_timeout_s=opts["drain_timeout_s"], screen=screen())
        for name in self.models:
            self.router.add(name)  # /health 503 until every model is attached
        try:
            for name, weights in routes.items():
                self.router.route(name, weights)
        except ValueError as e:
            raise app.UsageError(f"--models_file={path}: {e}") from e
        if path is None:
            self.router.precision_route(served, high=f"{served}@high", fast=f"{served}@fast",
                                        auto_fast_prompt_chars=FLAGS.auto_fast_prompt_chars,
                                        auto_fast_load=FLAGS.auto_fast_load)

    def load_model(self, name: str, path: str):
        return load_weights(path, self.opts, self.mesh, self.models[name].get("quant"))

    def start_engine(self, name: str, model):
        return start_engine(model, self.engine_config(name), self.mesh)

    def engine_config(self, name: str):
        share = self.models[name].get("kv_cache_gb")  # this model's part of the memory
        return self.config if share is None else dataclasses.replace(
            self.config, kv_cache_gb=share, num_pages=None)

    def load_all(self) -> None:
        self.mesh = distributed.setup()
        for name, entry in self.models.items():
            engine = load_and_start(entry["path"], self.opts, self.engine_config(name),
                                    self.mesh, entry.get("quant"))
            self.router.states[name].attach(engine)


def main(argv: list[str]) -> None:
    started = time.perf_counter()  # after jax's import (about 3 s on 2 cores)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import uvicorn
    from absl import logging as absl_logging

    from jaxinfer.serving.server import ServerState, create_app

    absl_logging.set_verbosity(absl_logging.WARNING)  # quiet jax's backend probing
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opts = settings()
    try:
        config = engine_config(opts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    key = watermark_key()
    if FLAGS.models_file and key is not None:
        raise app.UsageError("--watermark_key serves one model; it is not supported with "
                             "--models_file yet")
    if FLAGS.models_file and FLAGS.fast_quant:
        raise app.UsageError("--fast_quant holds --model in two formats; with --models_file "
                             "give each format its own [models.NAME] entry instead")
    if FLAGS.fast_quant and key is not None:
        raise app.UsageError("--watermark_key serves one model; it is not supported with "
                             "--fast_quant yet")
    several = FLAGS.models_file or FLAGS.fast_quant
    if several:  # several models: the router is the app, and drains them all
        models = MultiModel(opts, config, FLAGS.models_file)
        state, asgi, name = models.router, models.router.app(), sorted(models.models)

        def load_and_start() -> None:
            models.load_all()
    else:
        state = ServerState(opts["served_model_name"] or opts["model"],
                            api_key=opts["api_key"] or None,
                            max_body_bytes=int(opts["max_body_mb"] * 2**20),
                            watermark_key=key, screen=screen())
        asgi, name = create_app(state), state.model_name

        def load_and_start() -> None:
            load_and_attach(opts, config, state)
    aborted: list[int] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.draining = True  # /health 503, new requests 503, in-flight ones finish
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            # uvicorn closes the listeners and waits for the connections while the drain runs;
            # the drain ends what is left with proper responses, so uvicorn never cancels one.
            drain = asyncio.ensure_future(state.drain(opts["drain_timeout_s"]))
            await super().shutdown(sockets)
            aborted.append(await drain)

    server = Server(uvicorn.Config(
        asgi, host=opts["host"], port=opts["port"], log_level="warning",
        timeout_graceful_shutdown=opts["drain_timeout_s"] + 30,  # a backstop past the drain
    ))
    failure: list[BaseException] = []

    def load() -> None:
        try:
            load_and_start()
            print(f"serving {name!r} on http://{opts['host']}:{opts['port']}/v1 "
                  f"({time.perf_counter() - started:.1f}s after start)",
                  file=sys.stderr, flush=True)
        except BaseException as e:  # noqa: BLE001 - any failure must stop the server
            log.exception("could not start the engine")
            failure.append(e)
            server.should_exit = True

    # uvicorn re-raises the signal that stopped it once drained; ignoring it lets us exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    threading.Thread(target=load, name="jaxinfer-load", daemon=True).start()
    server.run()
    if several:
        state.stop(timeout=10)
    elif state.scheduler is not None:
        state.scheduler.stop(timeout=10)
    if failure:
        sys.exit(1)
    if aborted and aborted[0]:
        print(f"stopped with {aborted[0]} request(s) unfinished after the "
              f"{opts['drain_timeout_s']}s drain", file=sys.stderr, flush=True)
        sys.exit(EXIT_ABORTED)
    print("drained; bye", file=sys.stderr, flush=True)


if __name__ == "__main__":
    app.run(main)
