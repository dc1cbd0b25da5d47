"""Which environment variables travel to the ranks, and OMP_NUM_THREADS per rank.

Processes started on this machine inherit the launcher's whole environment. Processes on
other nodes get only the allow-list below (names present in the launcher's environment)
plus ``--env KEY=VALUE``; everything else (PATH, HOME, ...) is the remote login's own.
Variables that a launcher sets per rank (RANK, MASTER_ADDR, ...) cannot be given with --env.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

from dist_opt.launch.errors import LaunchError

ALLOWED_NAMES = frozenset(
    {
        "PYTHONPATH",
        "PYTHONHASHSEED",
        "PYTHONUNBUFFERED",
        "PYTHONWARNINGS",
        "PYTHONFAULTHANDLER",
        "CUBLAS_WORKSPACE_CONFIG",
        "CUDA_LAUNCH_BLOCKING",
        "HF_HOME",
    }
)
ALLOWED_PREFIXES = (
    "DIST_OPT_",
    "TORCH_",
    "PYTORCH_",
    "NCCL_",
    "GLOO_",
    "OMP_",
    "MKL_",
    "KMP_",
    "WANDB_",
    "DS_",
    "UCX_",
    "OMPI_MCA_",
    "PRTE_MCA_",
    "PMIX_MCA_",
)
RESERVED_NAMES = frozenset(
    {
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "ROLE_RANK",
        "ROLE_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "LOCAL_SIZE",
        "CROSS_RANK",
        "CROSS_SIZE",
        "CUDA_VISIBLE_DEVICES",
    }
)
RESERVED_PREFIXES = ("OMPI_COMM_WORLD_", "PMI_", "PMIX_RANK", "SLURM_", "TORCHELASTIC_")
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_allowed(name: str) -> bool:
    """Whether ``name`` is forwarded to other nodes by default."""
    return name in ALLOWED_NAMES or name.startswith(ALLOWED_PREFIXES)


def is_secret(name: str) -> bool:
    """Names whose values are shown as <redacted> in --dry-run output."""
    upper = name.upper()
    return any(word in upper for word in SECRET_WORDS)


def parse_env_assignments(items: Iterable[str]) -> dict[str, str]:
    """``--env KEY=VALUE`` items -> dict; raises :class:`LaunchError` naming the bad item."""
    out: dict[str, str] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq:
            raise LaunchError(f"--env {item!r}: expected KEY=VALUE")
        if not _NAME.match(name):
            raise LaunchError(f"--env {item!r}: {name!r} is not a valid environment variable name")
        if name in RESERVED_NAMES or name.startswith(RESERVED_PREFIXES):
            raise LaunchError(
                f"--env {item!r}: {name} is set by the launcher for each rank "
                "(use --master-addr/--master-port for the rendezvous address)"
            )
        if "\0" in value:
            raise LaunchError(f"--env {name}: the value contains a NUL byte")
        out[name] = value
    return out


def forwarded_env(
    environ: Mapping[str, str], extra: Mapping[str, str], omp_num_threads: int | None = None
) -> dict[str, str]:
    """What a node's ranks get on top of their own environment, sorted by name.

    Allow-listed variables of ``environ``, then OMP_NUM_THREADS (computed per rank, so it beats an
    inherited value), then ``extra`` from ``--env`` (which beats everything).
    """
    env = {k: v for k, v in environ.items() if is_allowed(k)}
    if omp_num_threads is not None:
        env["OMP_NUM_THREADS"] = str(omp_num_threads)
    env.update(extra)
    return dict(sorted(env.items()))


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which respects cgroups/taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def omp_threads(cores: int, procs: int) -> int:
    """Threads per rank when ``procs`` ranks share ``cores`` cores: floor division, at least 1."""
    if procs <= 0:
        raise ValueError(f"procs must be positive, got {procs}")
    return max(1, cores // procs)
