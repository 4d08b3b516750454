"""Device meshes with named axes, and multi-host start-up.

A mesh spec names how many devices go on each axis: "data:2,model:4". The default puts
every device on `model` (tensor parallelism), which is what one model on many chips wants.
Multi-host runs call `initialize_distributed` first; on one host it does nothing, so the
same code path serves a laptop, one GPU box, a TPU pod slice and a SLURM GPU cluster.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

log = logging.getLogger(__name__)

MESH_AXES = ("data", "model")  # data: independent batch rows; model: one model's tensors
# Axes a mesh has only when the spec names them; expert: a mixture's experts (see models/moe.py).
OPTIONAL_MESH_AXES = ("expert",)
ORDER = ("data", "expert", "model")  # model innermost: its collectives run every layer


def parse_mesh_spec(spec: str | Mapping[str, int] | None, n_devices: int) -> dict[str, int]:
    """"data:2,model:4" (or {"model": 8}) -> sizes of every mesh axis, checked against the
    device count. Axes left out get size 1; one axis may be -1 ("all remaining devices").
    None or "" puts every device on `model`."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return {"data": 1, "model": n_devices}
    if isinstance(spec, str):
        sizes = {}
        for part in spec.split(","):
            name, sep, size = part.strip().partition(":")
            if not sep:
                raise ValueError(f"mesh spec {spec!r}: {part!r} is not axis:size "
                                 f"(example: data:2,model:4)")
            try:
                sizes[name.strip()] = int(size)
            except ValueError:
                raise ValueError(f"mesh spec {spec!r}: size {size!r} of axis {name!r} is not "
                                 "an integer") from None
    else:
        sizes = dict(spec)
    allowed = MESH_AXES + OPTIONAL_MESH_AXES
    unknown = [name for name in sizes if name not in allowed]
    if unknown:
        raise ValueError(f"mesh spec {spec!r}: unknown axis {unknown[0]!r}; "
                         f"allowed axes: {', '.join(allowed)}")
    named = [name for name in ORDER if name in MESH_AXES or name in sizes]
    sizes = {name: sizes.get(name, 1) for name in named}
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"mesh spec {spec!r}: sizes must be positive (or -1 for the rest)")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {free}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if n_devices % fixed:
            raise ValueError(f"mesh spec {spec!r}: {n_devices} devices do not divide into "
                             f"the fixed axes' {fixed}")
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        shape = " x ".join(f"{n}:{s}" for n, s in sizes.items())
        raise ValueError(f"mesh spec {spec!r} ({shape}) has {math.prod(sizes.values())} "
                         f"devices but this run has {n_devices} (over {jax.process_count()} "
                         "process(es)); the sizes must multiply to the device count")
    return sizes


def make_mesh(
    spec: str | Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh with axes ("data", "model"), and "expert" between them when the spec names it,
    over `devices` (default: every device of every process), laid out for the hardware's
    interconnect by `jax.make_mesh`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    # Auto axes: jit (GSPMD) propagates shardings from the params and layer-boundary hints.
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), (AxisType.Auto,) * len(sizes),
                         devices=devices)


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    """A 1 x 1 mesh on one device: sharded code paths with no sharding."""
    device = device or jax.devices()[0]
    return Mesh(np.array([[device]]), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def describe(mesh: Mesh) -> str:
    """"data:2,model:4 over 8 cpu devices (2 processes)" for logs."""
    axes = ",".join(f"{name}:{size}" for name, size in mesh.shape.items())
    platform = mesh.devices.flat[0].platform
    return (f"{axes} over {mesh.devices.size} {platform} devices "
            f"({len({d.process_index for d in mesh.devices.flat})} process(es))")


def _detected_cluster() -> str | None:
    """Which multi-host launcher started this process, if jax can read it (else None)."""
    env = os.environ
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len(hosts.split(",")) > 1:
        return "TPU pod slice"
    return None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


_initialized = False


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    force: bool = False,
) -> bool:
    """Joins a multi-host job through `jax.distributed.initialize`; returns whether it did.

    Arguments (the launchers' flags) win; unset ones come from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID, then from jax's own detection of TPU pod slices,
    SLURM and Open MPI jobs. A single-host run with none of these does nothing (`force`
    calls jax's detection anyway, e.g. on a TPU VM whose environment names no workers).
    Must run before anything touches the devices.
    """
    global _initialized
    if _initialized:
        return True
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = _env_int("JAX_NUM_PROCESSES") if num_processes is None else num_processes
    process_id = _env_int("JAX_PROCESS_ID") if process_id is None else process_id
    given = (coordinator_address, num_processes, process_id)
    cluster = _detected_cluster()
    if all(v is None for v in given) and cluster is None and not force:
        return False
    if cluster is None and not force and None in given:
        raise ValueError(
            f"multi-host start needs a coordinator address, process count and process id; got "
            f"coordinator_address={coordinator_address!r}, num_processes={num_processes}, "
            f"process_id={process_id} (flags --coordinator_address/--num_processes/--process_id "
            "or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID)")
    if num_processes is not None and process_id is not None and \
            not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, {num_processes})")
    # CPU devices exchange data through gloo (accelerators use their own interconnect).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("joining a multi-host job (%s)", cluster or coordinator_address)
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    _initialized = True
    log.info("process %d of %d; %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
