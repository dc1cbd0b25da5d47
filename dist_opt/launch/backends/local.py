"""local: the launcher itself starts every rank on this machine (RANK/WORLD_SIZE/MASTER_* per rank)."""

from __future__ import annotations

from dist_opt.launch.backends.common import master_port, no_restarts, node_env
from dist_opt.launch.errors import LaunchError
from dist_opt.launch.hostfile import is_local
from dist_opt.launch.plan import Plan, Proc, Request


def build(req: Request) -> Plan:
    no_restarts(req)
    if req.multi_node or not is_local(req.nodes[0].host):
        raise LaunchError(
            "--launcher local runs on this machine only (use torchrun, deepspeed or mpirun "
            "for a hostfile with other hosts)"
        )
    node = req.nodes[0]
    port = master_port(req)
    addr = req.master_addr or "127.0.0.1"
    base = node_env(req, node.nproc)
    procs = []
    for rank in range(node.nproc):
        env = dict(
            base,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(node.nproc),
            LOCAL_WORLD_SIZE=str(node.nproc),
            MASTER_ADDR=addr,
            MASTER_PORT=str(port),
        )
        procs.append(
            Proc(
                label=f"rank {rank} (localhost)",
                host="localhost",
                argv=[req.python, "-u", *req.entry()],
                env=env,
            )
        )
    return Plan(launcher="local", procs=procs, world_size=node.nproc)
