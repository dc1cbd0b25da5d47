"""Open MPI: one ``mpiexec`` on this machine starts every rank; ranks bootstrap from MPI.

The ranks read OMPI_COMM_WORLD_* (dist_opt.dist.env) and, without MASTER_PORT, rank 0
broadcasts a free port over MPI (mpi4py). Variables reach the ranks with ``-x NAME`` (the
value stays in mpiexec's environment, not on its command line). Open MPI refuses to run as
root unless told: pass ``--allow-run-as-root`` (forwarded to mpiexec) or export
OMPI_ALLOW_RUN_AS_ROOT=1 and OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1.
"""

from __future__ import annotations

import os
import shutil

from dist_opt.launch.backends.common import master_addr, no_restarts, node_env, sibling_executable
from dist_opt.launch.errors import LaunchError
from dist_opt.launch.plan import Plan, Proc, Request, SshOptions

_ROOT_VARS = ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM")


def _mpiexec(req: Request) -> str:
    found = sibling_executable(req.python, "mpiexec") or shutil.which("mpiexec")
    if found:
        return found
    if req.dry_run:
        return "mpiexec"
    raise LaunchError(
        "--launcher mpirun: mpiexec not found (pip install 'dist-opt[mpi]' or install Open MPI)"
    )


def _ssh_args(opts: SshOptions) -> str:
    parts = ["-o BatchMode=yes", f"-o ConnectTimeout={opts.connect_timeout}"]
    if opts.config:
        parts.append(f"-F {opts.config}")
    if opts.port is not None:
        parts.append(f"-p {opts.port}")
    parts += [f"-o {o}" for o in opts.options]
    return " ".join(parts)


def build(req: Request) -> Plan:
    no_restarts(req)
    is_root = os.geteuid() == 0
    if is_root and not req.allow_run_as_root and not all(req.environ.get(v) for v in _ROOT_VARS):
        raise LaunchError(
            "--launcher mpirun as root: Open MPI refuses to run as root; pass --allow-run-as-root "
            "or export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"
        )
    busiest = max(n.nproc for n in req.nodes)
    env = node_env(req, busiest)
    env["MASTER_ADDR"] = master_addr(req)
    if req.master_port is not None:
        env["MASTER_PORT"] = str(req.master_port)
    hosts = ",".join(f"{'localhost' if n.host is None else n.host}:{n.nproc}" for n in req.nodes)
    argv = [
        _mpiexec(req),
        "-n",
        str(req.world_size),
        "--host",
        hosts,
        "--map-by",
        "slot",
        "--bind-to",
        "none",
    ]
    if req.allow_run_as_root:
        argv.append("--allow-run-as-root")
    if req.multi_node:
        argv += ["--prtemca", "plm_ssh_args", _ssh_args(req.ssh)]
    for name in env:
        argv += ["-x", name]
    argv += [req.python, "-u", *req.entry()]
    proc = Proc(label="mpiexec (localhost)", host="localhost", argv=argv, env=env)
    return Plan(launcher="mpirun", procs=[proc], world_size=req.world_size)
