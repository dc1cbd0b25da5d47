"""Which rank am I? The only module that knows launcher environment variable names.

Recognised launchers, in order of precedence:
  torchrun / deepspeed / torch elastic: RANK, LOCAL_RANK, WORLD_SIZE (+ MASTER_ADDR/PORT)
  Open MPI (mpirun/mpiexec):            OMPI_COMM_WORLD_RANK, _LOCAL_RANK, _SIZE
  PMI (MPICH, Intel MPI, Hydra):        PMI_RANK, PMI_SIZE (+ MPI_LOCALRANKID / PMI_LOCAL_RANK)
  SLURM srun:                           SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


class LaunchEnvError(RuntimeError):
    """Inconsistent or incomplete launcher environment."""


@dataclass(frozen=True)
class DistEnv:
    launcher: str  # torchrun | mpi | pmi | slurm | none
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int | None = None
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def is_launched(self) -> bool:
        return self.launcher != "none"


_SCHEMES: dict[str, tuple[str, str, tuple[str, ...], str | None]] = {
    # name: (rank var, world var, local rank vars (first present wins), local world var)
    "torchrun": ("RANK", "WORLD_SIZE", ("LOCAL_RANK",), "LOCAL_WORLD_SIZE"),
    "mpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",),
            "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "pmi": ("PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK"), "MPI_LOCALNRANKS"),
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS", ("SLURM_LOCALID",), "SLURM_NTASKS_PER_NODE"),
}


def _int(env: Mapping[str, str], name: str, minimum: int) -> int:
    raw = env[name]
    try:
        value = int(raw.strip())
    except ValueError:
        raise LaunchEnvError(f"environment variable {name}={raw!r}: expected an integer") from None
    if value < minimum:
        raise LaunchEnvError(f"environment variable {name}={value}: expected >= {minimum}")
    return value


def _port(env: Mapping[str, str]) -> int | None:
    if "MASTER_PORT" not in env:
        return None
    port = _int(env, "MASTER_PORT", 1)
    if port > 65535:
        raise LaunchEnvError(f"environment variable MASTER_PORT={port}: expected a TCP port 1..65535")
    return port


def detect(env: Mapping[str, str]) -> DistEnv:
    """Rank, local rank and world size from the launcher's environment.

    A launcher counts as present when its rank or world variable is set; then both must be
    set and consistent (0 <= rank < world). torchrun-style variables take precedence, because
    torchrun/deepspeed started under srun or mpirun set them for their own children.
    """
    for name, (rank_v, world_v, local_vs, local_world_v) in _SCHEMES.items():
        if rank_v not in env and world_v not in env:
            continue
        if name == "slurm" and "SLURM_PROCID" not in env:
            continue  # an sbatch allocation without srun: not launched per rank
        missing = [v for v in (rank_v, world_v) if v not in env]
        if missing:
            raise LaunchEnvError(
                f"{name} launcher environment incomplete: {', '.join(missing)} missing "
                f"(have {rank_v if rank_v in env else world_v})"
            )
        rank = _int(env, rank_v, 0)
        world = _int(env, world_v, 1)
        if rank >= world:
            raise LaunchEnvError(f"{rank_v}={rank} is not below {world_v}={world}")
        local_rank = next((_int(env, v, 0) for v in local_vs if v in env), None)
        if local_rank is None:
            local_rank = rank if world == 1 else 0
            if name == "torchrun":
                raise LaunchEnvError("torchrun launcher environment incomplete: LOCAL_RANK missing")
        local_world = None
        if local_world_v and local_world_v in env:
            raw = env[local_world_v].split("(")[0].split(",")[0]  # SLURM: "4(x2)"
            local_world = _int({local_world_v: raw}, local_world_v, 1)
            if local_rank >= local_world:
                raise LaunchEnvError(f"local rank {local_rank} is not below {local_world_v}={local_world}")
        return DistEnv(
            launcher=name,
            rank=rank,
            local_rank=local_rank,
            world_size=world,
            local_world_size=local_world,
            master_addr=env.get("MASTER_ADDR"),
            master_port=_port(env),
        )
    return DistEnv(launcher="none", rank=0, local_rank=0, world_size=1, local_world_size=1)
