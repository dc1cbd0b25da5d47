"""Join (and leave) the torch.distributed process group with an explicit timeout."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dist_opt.dist.env import DistEnv, LaunchEnvError
from dist_opt.dist.lifeline import watch_parent
from dist_opt.dist.ports import free_port
from dist_opt.dist.slurm import hostnames


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise LaunchEnvError("distributed.backend=nccl but CUDA is not available (use gloo or auto)")
    return backend


def _mpi_rendezvous(env: DistEnv) -> tuple[str, int]:
    """MPI ranks agree on a master address and port: rank 0 picks, MPI broadcasts."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LaunchEnvError(
            "started by mpirun without MASTER_ADDR/MASTER_PORT and mpi4py is missing: "
            "pip install 'dist-opt[mpi]' or export MASTER_ADDR and MASTER_PORT"
        ) from e
    comm = MPI.COMM_WORLD
    payload = None
    if comm.Get_rank() == 0:
        addr = env.master_addr or os.environ.get("DIST_OPT_MASTER_ADDR") or _own_address()
        payload = (addr, env.master_port or free_port("0.0.0.0"))
    return comm.bcast(payload, root=0)


def _own_address() -> str:
    host = socket.gethostname()
    try:
        return socket.gethostbyname(host)
    except OSError:
        return "127.0.0.1"


def rendezvous_address(env: DistEnv) -> tuple[str, int]:
    if env.master_addr and env.master_port:
        return env.master_addr, env.master_port
    if env.launcher in ("mpi", "pmi"):
        return _mpi_rendezvous(env)
    if env.launcher == "slurm":
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise LaunchEnvError("SLURM launch without MASTER_ADDR and without SLURM_JOB_NODELIST")
        addr = env.master_addr or hostnames(nodelist)[0]
        job = int(os.environ.get("SLURM_JOB_ID", "0") or 0)
        return addr, env.master_port or 20000 + job % 20000
    raise LaunchEnvError(f"{env.launcher} launch without MASTER_ADDR/MASTER_PORT")


def init_process_group(env: DistEnv, backend: str = "auto", timeout_s: float = 300.0) -> torch.device:
    """Join the group described by ``env``; returns this rank's compute device."""
    backend = resolve_backend(backend)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device
    timeout = timedelta(seconds=timeout_s)
    if env.is_launched:
        watch_parent(label=f"dist-opt: rank {env.rank}")  # never outlive the launcher (SIGKILL included)
        addr, port = rendezvous_address(env)
    else:
        addr, port = "127.0.0.1", free_port()
    kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    if env.launcher == "torchrun" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun (torch >= 2.5) keeps one agent-hosted store across restart rounds; without a
        # per-attempt prefix a restarted group reads the previous attempt's keys and hangs
        # (pytorch#135712). Connect to the agent's store and namespace it by attempt.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(
            f"dist-opt/attempt-{attempt}",
            dist.TCPStore(addr, port, env.world_size, is_master=False, timeout=timeout),
        )
        dist.init_process_group(
            backend=backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout, **kwargs
        )
        return device
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{addr}:{port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        **kwargs,
    )
    return device


def destroy_process_group() -> None:
    """Tear down every group, after all ranks got here: gloo aborts a process whose peer closes a
    connection (e.g. by exiting) while it still has work in flight on that group."""
    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a failed peer: nothing left to wait for
            pass
        dist.destroy_process_group()
