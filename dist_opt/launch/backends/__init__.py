"""Per-launcher command builders: ``build(request) -> Plan``, one module per launcher."""

from __future__ import annotations

from collections.abc import Callable

from dist_opt.launch.backends import deepspeed, local, mpirun, slurm, torchrun
from dist_opt.launch.plan import Plan, Request

BUILDERS: dict[str, Callable[[Request], Plan]] = {
    "torchrun": torchrun.build,
    "deepspeed": deepspeed.build,
    "mpirun": mpirun.build,
    "slurm": slurm.build,
    "local": local.build,
}

__all__ = ["BUILDERS"]
