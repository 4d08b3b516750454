"""Runs SmolLM2 on meshes of 8 fake CPU devices; prints what it saw as JSON.

Started by tests/test_multidevice.py in a fresh process (jax fixes the device count when
it starts): python tests/multidevice_worker.py GGUF_PATH WORK_DIR PROMPTS_JSON
The test compares the tokens and logits with its own single-device run of the same prompts.
"""

from __future__ import annotations

import json
import os
import sys

MESHES = ("data:1,model:8", "data:2,model:4", "data:8,model:1")
MAX_NEW = 8
LOGIT_TOKENS = 8  # logits are compared over each prompt's first 8 tokens


def logit_inputs(prompts: list[list[int]]):
    """[batch, 8] token ids: each prompt's first tokens, zero-padded."""
    import numpy as np

    tokens = np.zeros((len(prompts), LOGIT_TOKENS), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : min(LOGIT_TOKENS, len(p))] = p[:LOGIT_TOKENS]
    return tokens


def logits_of(params, tokens, cfg):
    """(logits [batch, seq, vocab] as numpy, the KV cache) of one forward under the current
    mesh (if any), with the cache placed as generate() places it."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxinfer.cache import KVCache
    from jaxinfer.models import family
    from jaxinfer.sharding import constrain_cache

    @jax.jit
    def forward(params, tokens):
        batch, seq = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        cache = constrain_cache(KVCache.init(cfg, batch, seq), cfg)
        return family(cfg.architecture).forward(params, tokens, positions, cache, cfg)

    logits, cache = forward(params, tokens)
    return np.asarray(logits), cache


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def shard_shapes(params) -> dict:
    import jax

    return {jax.tree_util.keystr(path, simple=True, separator="."): list(
        leaf.addressable_shards[0].data.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def main(gguf_path: str, work_dir: str, prompts_json: str) -> None:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_enable_fast_math=false"
                               " --xla_force_host_platform_device_count=8")
    import jax
    import numpy as np
    from absl import flags

    import jaxinfer
    from jaxinfer.bench.machine import peak_rss_bytes
    from jaxinfer.checkpoints import gguf
    from jaxinfer.launch import convert
    from jaxinfer.sharding import make_mesh

    def save(array, name: str) -> str:
        path = os.path.join(work_dir, name.replace(":", "").replace(",", "-") + ".npy")
        np.save(path, array)
        return path

    prompts = json.loads(prompts_json)
    tokens = logit_inputs(prompts)
    facts: dict = {"devices": jax.device_count(), "meshes": {}}
    # Peak host memory of a single-device load, measured before anything else grows the heap.
    before = rss_bytes()
    cfg, params, _ = gguf.load_gguf(gguf_path, dtype="float32", progress=False)
    jax.block_until_ready(params)
    peak = peak_rss_bytes()  # VmHWM: not the forking pytest process's peak
    facts["load_peak_rss_bytes"] = peak - before
    facts["param_bytes"] = sum(x.nbytes for x in jax.tree.leaves(params))
    del params

    for spec in MESHES:
        mesh = make_mesh(spec)
        _, params, _ = gguf.load_gguf(gguf_path, dtype="float32", mesh=mesh, progress=False)
        with jax.set_mesh(mesh):
            logits, cache = logits_of(params, tokens, cfg)
        facts["meshes"][spec] = {
            "tokens": jaxinfer.generate(params, prompts, cfg, max_new_tokens=MAX_NEW).tokens,
            "logits": save(logits, f"logits-{spec}"),
            "shard_shapes": shard_shapes(params),
            "cache_shard_shape": list(cache.k.addressable_shards[0].data.shape),
        }
        if spec == MESHES[1]:  # speculative decoding (n-gram drafts) under a mesh
            facts["meshes"][spec]["speculative_tokens"] = jaxinfer.generate(
                params, prompts, cfg, max_new_tokens=MAX_NEW, speculative_method="ngram",
                num_speculative_tokens=4).tokens
        del params

    # Convert with the launcher (one device), then restore onto a 2 x 4 mesh.
    output = os.path.join(work_dir, "smollm2-orbax")
    flags.FLAGS([sys.argv[0], f"--model={gguf_path}", f"--output={output}"])
    convert.main([sys.argv[0]])
    mesh = make_mesh(MESHES[1])
    model = jaxinfer.load_model(output, mesh=mesh, dtype="float32", progress=False)
    with jax.set_mesh(mesh):
        logits, _ = logits_of(model.params, tokens, cfg)
    facts["orbax"] = {
        "mesh": MESHES[1],
        "logits": save(logits, "logits-orbax"),
        "shard_shapes": shard_shapes(model.params),
        "config_equal": model.config == cfg,
        "encode": model.tokenizer.encode("Hello, world!"),
        "stop_ids": list(model.tokenizer.stop_ids),
    }
    print("FACTS " + json.dumps(facts))


if __name__ == "__main__":
    main(*sys.argv[1:])
