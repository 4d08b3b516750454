"""Runs a tiny random MoE model on meshes of 8 fake CPU devices; prints what it saw as JSON.

Started by tests/test_moe_multidevice.py in a fresh process (jax fixes the device count when
it starts): python tests/moe_multidevice_worker.py WORK_DIR
Each mesh's greedy tokens and logits are compared there with this process's one-device run.
"""

from __future__ import annotations

import json
import os
import sys

MESHES = ("expert:8", "data:2,expert:4", "expert:2,model:4")
PROMPTS = ([5, 17, 99, 3, 42, 7, 11, 200, 31], [250, 8, 64, 1, 77])
MAX_NEW = 8
# 8 experts, 2 per token; heads 4 / kv heads 2 (model:4 splits head_dim), expert width 32;
# gpt-oss's expert biases and router bias, so a bias split over `model` is checked too.
CONFIG = dict(architecture="mixtral", vocab_size=256, embed_dim=64, n_layers=2, n_heads=4,
              n_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=128, n_experts=8,
              experts_per_token=2, expert_mlp_dim=32, expert_bias=True, router_bias=True)


def main(work_dir: str) -> None:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_enable_fast_math=false"
                               " --xla_force_host_platform_device_count=8")
    import jax
    import numpy as np
    from multidevice_worker import logit_inputs, logits_of, shard_shapes

    import jaxinfer
    from jaxinfer.config import ModelConfig
    from jaxinfer.models import llama
    from jaxinfer.sharding import make_mesh, shard_params

    cfg = ModelConfig(**CONFIG)
    # Weights 10x the init's scale: logits spread wide enough for decisive greedy paths.
    params = jax.tree.map(lambda p: p * 10, llama.init_params(cfg, jax.random.key(0)))
    prompts = [list(p) for p in PROMPTS]
    tokens = logit_inputs(prompts)

    def save(array, name: str) -> str:
        path = os.path.join(work_dir, name.replace(":", "").replace(",", "-") + ".npy")
        np.save(path, array)
        return path

    logits, _ = logits_of(params, tokens, cfg)
    greedy = jaxinfer.generate(params, prompts, cfg, max_new_tokens=MAX_NEW).tokens
    # The one-device logits that chose each greedy token (teacher-forced along them).
    chose = [save(logits_of(params, np.array([p + t[:-1]]), cfg)[0][0, len(p) - 1:],
                  f"chose-{i}") for i, (p, t) in enumerate(zip(prompts, greedy, strict=True))]
    facts: dict = {"devices": jax.device_count(), "meshes": {}, "one_device": {
        "tokens": greedy, "logits": save(logits, "logits-one"), "chose": chose}}
    for spec in MESHES:
        mesh = make_mesh(spec)
        sharded = shard_params(params, cfg, mesh)
        with jax.set_mesh(mesh):
            logits, _ = logits_of(sharded, tokens, cfg)
        facts["meshes"][spec] = {
            "tokens": jaxinfer.generate(sharded, prompts, cfg, max_new_tokens=MAX_NEW).tokens,
            "logits": save(logits, f"logits-{spec}"),
            "shard_shapes": shard_shapes(sharded),
            "expert_gate_devices": len({s.device for s in sharded["layers"]["expert_gate"]
                                        .addressable_shards}),
        }
    print("FACTS " + json.dumps(facts))


if __name__ == "__main__":
    main(*sys.argv[1:])
