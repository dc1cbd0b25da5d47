"""DeepSpeed: the ``deepspeed`` runner on one node; its per-node launcher on every node of several.

One node: ``deepspeed --num_gpus P --master_addr ... --module --no_local_rank dist_opt.train ...``
(``--num_gpus`` is DeepSpeed's alias of ``--num_accelerators``; with ``DS_ACCELERATOR=cpu`` it is
the number of CPU ranks). Several nodes: DeepSpeed's runner would fan out with pdsh; instead the
launcher starts DeepSpeed's own per-node launcher, ``python -m deepspeed.launcher.launch
--world_info=... --node_rank=i``, on each node over its ssh, exactly what the pdsh runner runs.
``world_info`` is the node -> slots map after --include/--exclude/--nnodes/--nproc-per-node.
"""

from __future__ import annotations

import base64
import json

from dist_opt.launch.backends.common import (
    master_addr,
    master_port,
    no_restarts,
    node_env,
    node_proc,
    sibling_executable,
)
from dist_opt.launch.hostfile import is_local
from dist_opt.launch.plan import Plan, Proc, Request, node_label


def world_info(req: Request) -> str:
    """DeepSpeed's ``--world_info``: urlsafe base64 of the JSON {host: [slot ids]}."""
    info = {str(n.host if n.host is not None else f"node{i}"): list(n.slots) for i, n in enumerate(req.nodes)}
    return base64.urlsafe_b64encode(json.dumps(info).encode("utf-8")).decode("ascii")


def _flags(req: Request) -> list[str]:
    if req.script is not None:
        return ["--no_local_rank", req.script, *req.overrides]
    return ["--module", "--no_local_rank", req.module, req.config, *req.overrides]


def build(req: Request) -> Plan:
    no_restarts(req)
    addr, port = master_addr(req), master_port(req)
    if not req.multi_node and is_local(req.nodes[0].host):
        node = req.nodes[0]
        runner = sibling_executable(req.python, "deepspeed")
        head = [runner] if runner else [req.python, "-m", "deepspeed.launcher.runner"]
        argv = [
            *head,
            f"--num_gpus={node.nproc}",
            f"--master_addr={addr}",
            f"--master_port={port}",
            *_flags(req),
        ]
        proc = Proc(label=node_label(0, node.host), host=node.host, argv=argv, env=node_env(req, node.nproc))
        return Plan(launcher="deepspeed", procs=[proc], world_size=req.world_size)
    info = world_info(req)
    procs = []
    for i, node in enumerate(req.nodes):
        argv = [
            req.python,
            "-u",
            "-m",
            "deepspeed.launcher.launch",
            f"--world_info={info}",
            f"--node_rank={i}",
            f"--master_addr={addr}",
            f"--master_port={port}",
            *_flags(req),
        ]
        procs.append(node_proc(req, i, node, argv))
    return Plan(launcher="deepspeed", procs=procs, world_size=req.world_size)
