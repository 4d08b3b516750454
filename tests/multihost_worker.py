"""One process of a two-process job on localhost (4 fake CPU devices each, gloo collectives).

Started twice by tests/test_multihost.py:
    python tests/multihost_worker.py PORT PROCESS_ID MESH GGUF_PATH PROMPTS_JSON
Prints this process's view of the generated tokens as JSON.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=false"
                           " --xla_force_host_platform_device_count=4")


def main(port: str, process_id: str, mesh_spec: str, gguf_path: str, prompts: str) -> None:
    import jax

    import jaxinfer
    from jaxinfer.sharding import initialize_distributed, make_mesh

    initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
    mesh = make_mesh(mesh_spec)
    model = jaxinfer.load_model(gguf_path, dtype="float32", mesh=mesh, progress=False)
    result = jaxinfer.generate(model.params, json.loads(prompts), model.config, max_new_tokens=8)
    print("RESULT " + json.dumps({
        "process": jax.process_index(), "processes": jax.process_count(),
        "local_devices": jax.local_device_count(), "devices": jax.device_count(),
        "tokens": result.tokens,
    }), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
