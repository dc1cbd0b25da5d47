"""torchrun: one ``torch.distributed.run`` per node, c10d rendezvous hosted by node 0."""

from __future__ import annotations

from dist_opt.launch.backends.common import master_addr, master_port, node_proc
from dist_opt.launch.hostfile import is_local
from dist_opt.launch.plan import Plan, Request, endpoint


def build(req: Request) -> Plan:
    addr, port = master_addr(req), master_port(req)
    procs = []
    for i, node in enumerate(req.nodes):
        conf = f"join_timeout={req.rdzv_timeout}"
        if node.host is not None:  # named nodes: node 0 hosts the store, a busy port fails there
            conf = f"is_host={1 if i == 0 else 0},{conf}"
        argv = [
            req.python,
            "-m",
            "torch.distributed.run",
            f"--nnodes={len(req.nodes)}",
            f"--nproc-per-node={node.nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint(addr, port)}",
            f"--rdzv-id={req.run_id}",
            f"--rdzv-conf={conf}",
            f"--max-restarts={req.max_restarts}",
            "--monitor-interval=1",
        ]
        if node.host is not None:
            argv.append(f"--local-addr={'127.0.0.1' if is_local(node.host) else node.host}")
        argv += req.entry()
        procs.append(node_proc(req, i, node, argv))
    return Plan(launcher="torchrun", procs=procs, world_size=req.world_size)
