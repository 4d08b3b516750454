"""Runs SmolLM2 on one device and on meshes of 8 fake CPU devices; prints facts as JSON.

Started by tests/test_sharding_multidevice.py in a fresh process (the device count is fixed
when jax starts): python tests/multidevice_worker.py GGUF_PATH WORK_DIR
"""

from __future__ import annotations

import json
import os
import resource
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=false"
                           " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxinfer.cache import KVCache  # noqa: E402
from jaxinfer.checkpoints import gguf  # noqa: E402
from jaxinfer.generate import generate  # noqa: E402
from jaxinfer.models import family  # noqa: E402
from jaxinfer.sharding import constrain_cache, make_mesh  # noqa: E402
from jaxinfer.tokenizer import Tokenizer  # noqa: E402

MESHES = ("data:1,model:8", "data:2,model:4", "data:8,model:1")
MAX_NEW = 8


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def logits_of(params, tokens: np.ndarray, cfg):
    """Logits [batch, seq, vocab] of a plain forward over `tokens` (under the current mesh)."""

    @jax.jit
    def forward(params, tokens):
        batch, seq = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        cache = constrain_cache(KVCache.init(cfg, batch, seq), cfg)
        return family(cfg.architecture).forward(params, tokens, positions, cache, cfg)

    logits, cache = forward(params, tokens)
    return np.asarray(logits), cache


def shard_shapes(params) -> dict:
    return {jax.tree_util.keystr(path, simple=True, separator="."): list(
        leaf.addressable_shards[0].data.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def main(gguf_path: str, work_dir: str) -> None:
    facts: dict = {"devices": jax.device_count()}
    # Peak host memory of a single-device load, measured before anything else grows the heap.
    before = rss_bytes()
    cfg, params, reader = gguf.load_gguf(gguf_path, dtype="float32", progress=False)
    jax.block_until_ready(params)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB
    facts["load_peak_rss_bytes"] = peak - before
    facts["param_bytes"] = sum(x.nbytes for x in jax.tree.leaves(params))
    tokenizer = Tokenizer.from_gguf(reader)
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.encode("def fib(n):")]
    tokens = np.zeros((2, 8), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : min(8, len(p))] = p[:8]
    facts["reference_tokens"] = generate(params, prompts, cfg, max_new_tokens=MAX_NEW).tokens
    reference_logits, _ = logits_of(params, tokens, cfg)
    del params

    facts["meshes"] = {}
    for spec in MESHES:
        mesh = make_mesh(spec)
        _, params, _ = gguf.load_gguf(gguf_path, dtype="float32", mesh=mesh, progress=False)
        with jax.set_mesh(mesh):
            logits, cache = logits_of(params, tokens, cfg)
        facts["meshes"][spec] = {
            "tokens": generate(params, prompts, cfg, max_new_tokens=MAX_NEW).tokens,
            "max_logit_diff": float(np.abs(logits - reference_logits).max()),
            "shard_shapes": shard_shapes(params),
            "cache_shard_shape": list(cache.k.addressable_shards[0].data.shape),
        }
        if spec == MESHES[0]:  # convert (one device) once; restore onto a mesh below
            from absl import flags

            from jaxinfer.launch import convert

            output = os.path.join(work_dir, "smollm2-orbax")
            flags.FLAGS([sys.argv[0], f"--model={gguf_path}", f"--output={output}"])
            convert.main([sys.argv[0]])
        del params

    import jaxinfer

    mesh = make_mesh(MESHES[1])
    model = jaxinfer.load_model(output, mesh=mesh, dtype="float32", progress=False)
    with jax.set_mesh(mesh):
        logits, _ = logits_of(model.params, tokens, cfg)
    facts["orbax"] = {
        "mesh": MESHES[1],
        "max_logit_diff": float(np.abs(logits - reference_logits).max()),
        "shard_shapes": shard_shapes(model.params),
        "config_equal": model.config == cfg,
        "encode_equal": model.tokenizer.encode("Hello, world!") == tokenizer.encode(
            "Hello, world!"),
        "stop_ids_equal": model.tokenizer.stop_ids == tokenizer.stop_ids,
    }
    print("FACTS " + json.dumps(facts))


if __name__ == "__main__":
    main(*sys.argv[1:])
