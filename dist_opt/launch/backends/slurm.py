"""SLURM: inside an allocation, one ``srun`` step with one task per rank.

Nodes come from SLURM_JOB_NODELIST (expanded by ``scontrol show hostnames`` when present,
else parsed), ranks per node from --nproc-per-node or SLURM_NTASKS_PER_NODE, cores from
SLURM_CPUS_ON_NODE. Ranks read SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS (dist_opt.dist.env);
MASTER_ADDR (the first node) and MASTER_PORT are exported to the step with ``--export=ALL``.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping

from dist_opt.dist.slurm import hostnames
from dist_opt.launch.backends.common import cores_here, no_restarts, node_env
from dist_opt.launch.envvars import omp_threads
from dist_opt.launch.errors import LaunchError
from dist_opt.launch.plan import Plan, Proc, Request
from dist_opt.launch.selection import Node


def _leading_int(text: str) -> int | None:
    head = text.split("(")[0].split(",")[0].strip()
    return int(head) if head.isdigit() else None


def allocation_nodes(
    environ: Mapping[str, str], nnodes: int | None, nproc_per_node: int | None
) -> list[Node]:
    """The nodes of the current allocation (first ``nnodes``), ``nproc_per_node`` slots each."""
    if not environ.get("SLURM_JOB_ID"):
        raise LaunchError(
            "--launcher slurm: not inside a SLURM allocation (SLURM_JOB_ID is not set); "
            "run it from sbatch or salloc"
        )
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("--launcher slurm: SLURM_JOB_NODELIST is not set")
    try:
        hosts = hostnames(nodelist)
    except ValueError as e:
        raise LaunchError(f"--launcher slurm: SLURM_JOB_NODELIST: {e}") from None
    if nnodes is not None:
        if nnodes > len(hosts):
            raise LaunchError(f"--nnodes {nnodes}: the allocation has only {len(hosts)} node(s)")
        hosts = hosts[:nnodes]
    per_node = nproc_per_node or _leading_int(environ.get("SLURM_NTASKS_PER_NODE", "")) or 1
    return [Node(host=h, slots=tuple(range(per_node))) for h in hosts]


def cores_on_node(environ: Mapping[str, str]) -> int | None:
    """SLURM_CPUS_ON_NODE (the cores this allocation has on the node), if set."""
    return _leading_int(environ.get("SLURM_CPUS_ON_NODE", ""))


def build(req: Request) -> Plan:
    no_restarts(req)
    hosts = [str(n.host) for n in req.nodes]
    per_node = req.nodes[0].nproc
    if any(n.nproc != per_node for n in req.nodes):
        raise LaunchError("--launcher slurm needs the same number of ranks on every node")
    cpus = omp_threads(cores_here(req), per_node)
    env = node_env(req, per_node)
    env["MASTER_ADDR"] = req.master_addr or hosts[0]
    job = int(req.environ.get("SLURM_JOB_ID", "0") or 0)
    env["MASTER_PORT"] = str(req.master_port if req.master_port is not None else 20000 + job % 20000)
    srun = shutil.which("srun") or "srun"
    if srun == "srun" and not req.dry_run:
        raise LaunchError("--launcher slurm: srun not found on PATH")
    argv = [
        srun,
        f"--nodes={len(hosts)}",
        f"--nodelist={','.join(hosts)}",
        f"--ntasks={len(hosts) * per_node}",
        f"--ntasks-per-node={per_node}",
        f"--cpus-per-task={cpus}",
        "--kill-on-bad-exit=1",
        "--export=ALL",
        req.python,
        "-u",
        *req.entry(),
    ]
    proc = Proc(label="srun (localhost)", host="localhost", argv=argv, env=dict(sorted(env.items())))
    return Plan(launcher="slurm", procs=[proc], world_size=req.world_size)
