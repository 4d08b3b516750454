"""Check the environment: `python -m jaxinfer.launch.doctor`.

Prints the backend and devices jax sees, jax / jaxlib / plugin versions, CUDA runtime and
driver compatibility, free device memory and whether the compilation cache is writable;
each problem comes with what to do about it. Exits 1 when a check fails.
"""

from __future__ import annotations

import sys

from absl import app
from absl import logging as absl_logging

from jaxinfer.launch import distributed


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # quiet jax's backend probing
    from jaxinfer import doctor

    checks = list(doctor.CHECKS)
    try:
        mesh = distributed.setup()  # multi-host flags: check that the job forms, too
    except (ValueError, RuntimeError) as e:
        print(f"[FAIL] mesh: {e}")
        sys.exit(1)
    results = doctor.run_checks(checks)
    if mesh is not None:
        from jaxinfer.sharding import describe

        results.append(doctor.Check("mesh", doctor.OK, describe(mesh)))
    print(doctor.report(results))
    failed = [r.name for r in results if r.status == doctor.FAIL]
    print(f"\n{len(failed)} check(s) failed: {', '.join(failed)}" if failed
          else "\nall checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    app.run(main)
