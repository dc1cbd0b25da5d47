"""Helpers shared by the builders: master address/port and per-node environment."""

from __future__ import annotations

from pathlib import Path

from dist_opt.dist.ports import free_port
from dist_opt.launch.envvars import forwarded_env, omp_threads, usable_cores
from dist_opt.launch.errors import LaunchError
from dist_opt.launch.hostfile import is_local
from dist_opt.launch.plan import Proc, Request, node_label
from dist_opt.launch.selection import Node

DEFAULT_PORT = 29500


def master_addr(req: Request) -> str:
    """--master-addr, else the first node; loopback only when every node is this machine."""
    if req.master_addr:
        return req.master_addr
    first = req.nodes[0].host
    if req.multi_node:
        if any(is_local(n.host) and n.host is not None for n in req.nodes):
            raise LaunchError(
                "localhost cannot be one of several nodes (the others could not reach it); "
                "name this machine by an address the other nodes can reach"
            )
        if first is None:
            raise LaunchError("--master-addr is needed when the nodes are not named by a hostfile")
        return first
    return "127.0.0.1" if is_local(first) else str(first)


def master_port(req: Request) -> int:
    """--master-port, else a free local port for a single local node, else 29500."""
    if req.master_port is not None:
        return req.master_port
    if not req.multi_node and is_local(req.nodes[0].host):
        return free_port()
    return DEFAULT_PORT


def cores_here(req: Request) -> int:
    """--cores-per-node (or the allocation's), else this machine's usable cores."""
    return req.cores_per_node or usable_cores()


def counts_own_cores(req: Request, host: str | None) -> bool:
    """Whether ``host`` computes OMP_NUM_THREADS from its own cores: another node, no --cores-per-node."""
    return req.cores_per_node is None and host is not None and not is_local(host)


def node_env(req: Request, procs: int, host: str | None = None) -> dict[str, str]:
    """Allow-listed env + OMP_NUM_THREADS for ``procs`` ranks on a node + --env, plus unbuffered output.

    For another node without --cores-per-node, OMP_NUM_THREADS is left out (an inherited value
    too): that node's shim computes it from its own cores (:attr:`Proc.omp_ranks`).
    """
    if counts_own_cores(req, host):
        environ = {k: v for k, v in req.environ.items() if k != "OMP_NUM_THREADS"}
        env = forwarded_env(environ, req.extra_env)
    else:
        env = forwarded_env(req.environ, req.extra_env, omp_threads(cores_here(req), procs))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return dict(sorted(env.items()))


def node_proc(req: Request, index: int, node: Node, argv: list[str]) -> Proc:
    """Node ``index``'s command: its environment, and OMP_NUM_THREADS counted there when it can be."""
    return Proc(
        label=node_label(index, node.host),
        host=node.host,
        argv=argv,
        env=node_env(req, node.nproc, node.host),
        omp_ranks=node.nproc if counts_own_cores(req, node.host) else None,
    )


def no_restarts(req: Request) -> None:
    if req.max_restarts:
        raise LaunchError(f"--max-restarts is supported by --launcher torchrun only, not {req.launcher}")


def sibling_executable(python: str, name: str) -> str | None:
    """``name`` next to the Python interpreter (a venv's bin/), if it exists there."""
    candidate = Path(python).parent / name
    return str(candidate) if candidate.is_file() else None
