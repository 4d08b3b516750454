"""Flags every launcher shares for meshes and multi-host runs, and the start-up they drive."""

from __future__ import annotations

from absl import flags
from jax.sharding import Mesh

FLAGS = flags.FLAGS
flags.DEFINE_string("mesh", None, "Device mesh, e.g. data:2,model:4 ('auto': every device on "
                    "model). Unset: one device.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 "
                    "(else JAX_COORDINATOR_ADDRESS, or detected on TPU pods / SLURM / MPI).")
flags.DEFINE_integer("num_processes", None, "Multi-host: how many processes in the job.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0-based.")
flags.DEFINE_boolean("distributed", False, "Multi-host: call jax.distributed.initialize() even "
                     "if the environment names no job (it then asks the TPU / cloud metadata).")


def setup(preset_mesh: str | None = None) -> Mesh | None:
    """Joins a multi-host job if the flags or environment describe one, then builds the mesh
    `--mesh` names, else the preset's `mesh` field (a multi-host job with neither gets every
    device on `model`; a single host gets None: one device)."""
    from jaxinfer.sharding import initialize_distributed, make_mesh

    joined = initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id, force=FLAGS.distributed)
    spec = FLAGS.mesh if FLAGS.mesh is not None else preset_mesh
    if spec is None and not joined:
        return None
    return make_mesh(None if spec in (None, "auto") else spec)
