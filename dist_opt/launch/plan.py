"""What to start where: the request (parsed options) and the plan (commands per node).

Builders (``dist_opt.launch.backends``) turn a :class:`Request` into a :class:`Plan` without starting
or importing anything heavy, so ``--dry-run`` prints exactly what a real launch would run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from dist_opt.launch.hostfile import is_local
from dist_opt.launch.selection import Node


@dataclass(frozen=True)
class SshOptions:
    """How the launcher reaches other nodes: ``ssh [-F config] [-p port] [-o opt]... host``."""

    config: str | None = None
    port: int | None = None
    options: tuple[str, ...] = ()
    connect_timeout: int = 10
    check: bool = True


@dataclass(frozen=True)
class Request:
    """Everything a builder needs; filled from the command line by :mod:`dist_opt.launch.cli`."""

    launcher: str
    nodes: list[Node]
    config: str
    overrides: tuple[str, ...] = ()
    module: str = "dist_opt.train"
    script: str | None = None  # a user's script (e.g. one calling dist_opt.fit) instead of -m MODULE
    python: str = "python3"
    cwd: str = "."
    master_addr: str | None = None
    master_port: int | None = None
    max_restarts: int = 0
    run_id: str = "dist-opt"
    rdzv_timeout: int = 300
    cores_per_node: int | None = None  # None: every node counts its own usable cores
    extra_env: Mapping[str, str] = field(default_factory=dict)
    environ: Mapping[str, str] = field(default_factory=dict)
    allow_run_as_root: bool = False
    ssh: SshOptions = field(default_factory=SshOptions)
    dry_run: bool = False

    @property
    def world_size(self) -> int:
        return sum(n.nproc for n in self.nodes)

    @property
    def multi_node(self) -> bool:
        return len(self.nodes) > 1

    def entry(self) -> list[str]:
        """``-m MODULE CONFIG overrides...`` (or ``SCRIPT args...``) as passed to every rank."""
        if self.script is not None:
            return [self.script, *self.overrides]
        return ["-m", self.module, self.config, *self.overrides]


@dataclass(frozen=True)
class Proc:
    """One command of the plan: run ``argv`` on ``host`` with ``env`` on top of that host's environment."""

    label: str
    host: str | None
    argv: list[str]
    env: dict[str, str]
    # set: the node's shim sets OMP_NUM_THREADS = its own usable cores // omp_ranks (unless env has it)
    omp_ranks: int | None = None

    @property
    def remote(self) -> bool:
        return not is_local(self.host)


@dataclass(frozen=True)
class Plan:
    launcher: str
    procs: list[Proc]
    world_size: int
    notes: list[str] = field(default_factory=list)


def node_label(index: int, host: str | None) -> str:
    return f"node {index} ({host})" if host else f"node {index}"


def endpoint(addr: str, port: int) -> str:
    """``host:port``, with IPv6 addresses in brackets."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
