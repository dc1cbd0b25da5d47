"""``dist-opt launch``: a config + a launcher choice (+ a hostfile) is all a user needs.

``main(argv) -> int``: 0 on success, 2 for bad input (nothing started), 1 (or the failing
node's exit code) when the launch failed, 4 when a stop signal made every rank stop and save,
124 on --timeout, 130 when interrupted without that outcome.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import socket
import sys
from collections.abc import Sequence

from dist_opt.launch.backends import BUILDERS
from dist_opt.launch.backends.slurm import allocation_nodes, cores_on_node
from dist_opt.launch.dryrun import render
from dist_opt.launch.envvars import parse_env_assignments
from dist_opt.launch.errors import LaunchError, LaunchFailure
from dist_opt.launch.hostfile import is_local, is_valid_host, read_hostfile
from dist_opt.launch.plan import Request, SshOptions
from dist_opt.launch.selection import Node, nodes_without_hostfile, select_nodes
from dist_opt.launch.supervisor import Supervisor

DEFAULT_MODULE = "dist_opt.train"
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SSH_OPTION = re.compile(r"^[A-Za-z][A-Za-z0-9]*=.+$", re.S)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, no usage dump
        raise LaunchError(message)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port 1..65535, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dist-opt launch", description="Start dist_opt.train on one or many nodes.")
    p.add_argument(
        "--launcher",
        choices=sorted(BUILDERS),
        default="torchrun",
        help="torchrun (default; one per node over ssh), deepspeed, mpirun (Open MPI), "
        "slurm (srun inside an allocation), local (this machine, no helper launcher)",
    )
    p.add_argument("--hostfile", help="'HOST slots=N' per line (DeepSpeed/Open MPI format)")
    p.add_argument(
        "--include", default="", help="DeepSpeed-style host/slot filter: HOST[:SLOT,...][@HOST...]"
    )
    p.add_argument("--exclude", default="", help="DeepSpeed-style host/slot filter to leave out")
    p.add_argument("--nnodes", type=_positive, help="use the first N hosts (default: all)")
    p.add_argument("--nproc-per-node", type=_positive, help="ranks per node (default: the host's slots)")
    p.add_argument("--master-addr", help="rendezvous address (default: the first node)")
    p.add_argument("--master-port", type=_port, help="rendezvous port (default: free port / 29500)")
    p.add_argument("--max-restarts", type=_non_negative, default=0, help="torchrun worker-group restarts")
    p.add_argument("--rdzv-timeout", type=_positive, default=300, help="torchrun rendezvous join timeout (s)")
    p.add_argument("--run-id", help="torchrun rendezvous id (default: random)")
    p.add_argument(
        "--cores-per-node",
        type=_positive,
        help="cores per node for OMP_NUM_THREADS = cores // ranks per node (default: each node's "
        "own usable cores, counted on that node, or SLURM_CPUS_ON_NODE)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment variable for every rank (repeatable)",
    )
    p.add_argument(
        "--module",
        default=DEFAULT_MODULE,
        help="entry module run by every rank as `python -m MODULE CONFIG KEY=VALUE...` (default dist_opt.train)",
    )
    p.add_argument(
        "--script",
        help="run this Python script on every rank instead (e.g. one calling dist_opt.fit); "
        "its arguments follow `--`, and CONFIG is not given",
    )
    p.add_argument(
        "--python",
        default=sys.executable,
        help="Python interpreter on every node (default: this one; nodes share the path)",
    )
    p.add_argument("--ssh-config", help="ssh client config file (ssh -F)")
    p.add_argument("--ssh-port", type=_port, help="ssh port of the nodes")
    p.add_argument(
        "--ssh-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra ssh -o option (repeatable)",
    )
    p.add_argument("--ssh-timeout", type=_positive, default=10, help="ssh ConnectTimeout (s)")
    p.add_argument("--no-ssh-check", action="store_true", help="skip the reachability check before starting")
    p.add_argument(
        "--allow-run-as-root", action="store_true", help="mpirun: pass --allow-run-as-root to mpiexec"
    )
    p.add_argument("--timeout", type=_seconds, help="stop everything and fail after this many seconds")
    p.add_argument("--no-validate", action="store_true", help="do not validate CONFIG before starting")
    p.add_argument(
        "--dry-run", action="store_true", help="print each node's command and environment; start nothing"
    )
    p.add_argument("config", metavar="CONFIG", nargs="?", help="YAML config file (not with --script)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE", help="dotted config overrides")
    return p


def _check_inputs(args: argparse.Namespace) -> None:
    if args.script is not None:
        if args.module != DEFAULT_MODULE:
            raise LaunchError("--script and --module: give one of them")
        if args.config is not None or args.overrides:
            raise LaunchError("--script: the script's arguments go after `--` (no CONFIG)")
        if not os.path.isfile(args.script):
            raise LaunchError(f"--script {args.script}: file not found")
        return _check_common(args)
    if args.config is None:
        raise LaunchError("CONFIG is required (or --script SCRIPT -- ARGS)")
    for item in args.overrides:
        if item.startswith("-"):
            raise LaunchError(f"{item!r} after CONFIG: options must come before CONFIG")
        if "=" not in item:
            raise LaunchError(f"override {item!r}: expected dotted.key=value")
    if not _MODULE.match(args.module):
        raise LaunchError(f"--module {args.module!r} is not a Python module name")
    _check_common(args)


def _check_common(args: argparse.Namespace) -> None:
    if args.run_id is not None and not _RUN_ID.match(args.run_id):
        raise LaunchError(f"--run-id {args.run_id!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    if args.master_addr is not None and not is_valid_host(args.master_addr):
        raise LaunchError(f"--master-addr {args.master_addr!r} is not a valid host name or address")
    for opt in args.ssh_option:
        if not _SSH_OPTION.match(opt):
            raise LaunchError(f"--ssh-option {opt!r}: expected Key=Value (an ssh_config option)")
    if args.ssh_config is not None and not os.path.isfile(args.ssh_config):
        raise LaunchError(f"--ssh-config {args.ssh_config}: file not found")
    if args.launcher == "slurm" and args.hostfile:
        raise LaunchError("--hostfile is not used with --launcher slurm (the allocation decides the nodes)")


def _nodes(args: argparse.Namespace) -> list[Node]:
    if args.launcher == "slurm":
        return allocation_nodes(os.environ, args.nnodes, args.nproc_per_node)
    if args.hostfile:
        return select_nodes(
            read_hostfile(args.hostfile), args.include, args.exclude, args.nnodes, args.nproc_per_node
        )
    if args.include or args.exclude:
        raise LaunchError("--include/--exclude need --hostfile")
    return nodes_without_hostfile(args.nnodes, args.nproc_per_node, args.dry_run)


def _validate_config(config: str, overrides: Sequence[str], world_size: int) -> None:
    from dist_opt.config.loader import ConfigError, load_config  # no torch import

    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    problems = cfg.check_world(world_size)
    if problems:
        raise LaunchError("; ".join(f"config error: {p}" for p in problems))


def _check_master_port(req: Request) -> None:
    """A busy rendezvous port on this machine fails now, naming node 0, instead of mid-rendezvous."""
    if req.master_port is None or not is_local(req.nodes[0].host) or req.launcher == "slurm":
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", req.master_port))
        except OSError as e:
            raise LaunchFailure(
                f"node 0 ({req.nodes[0].host}): master port {req.master_port} is not free "
                f"on this machine ({e.strerror})"
            ) from None


def make_request(args: argparse.Namespace) -> Request:
    _check_inputs(args)
    nodes = _nodes(args)
    # None: every node counts its own cores (the shim on another node, usable_cores() here)
    cores = args.cores_per_node or (cores_on_node(os.environ) if args.launcher == "slurm" else None)
    if args.script is not None:
        config, overrides = "", tuple(getattr(args, "script_args", ()))
    else:
        config = os.path.abspath(args.config) if os.path.exists(args.config) else args.config
        overrides = tuple(args.overrides)
    req = Request(
        launcher=args.launcher,
        nodes=nodes,
        config=config,
        overrides=overrides,
        module=args.module,
        script=os.path.abspath(args.script) if args.script is not None else None,
        python=args.python,
        cwd=os.getcwd(),
        master_addr=args.master_addr,
        master_port=args.master_port,
        max_restarts=args.max_restarts,
        run_id=args.run_id or f"dist-opt-{secrets.token_hex(4)}",
        rdzv_timeout=args.rdzv_timeout,
        cores_per_node=cores,
        extra_env=parse_env_assignments(args.env),
        environ=dict(os.environ),
        allow_run_as_root=args.allow_run_as_root,
        ssh=SshOptions(
            config=args.ssh_config,
            port=args.ssh_port,
            options=tuple(args.ssh_option),
            connect_timeout=args.ssh_timeout,
            check=not args.no_ssh_check,
        ),
        dry_run=args.dry_run,
    )
    if args.module == DEFAULT_MODULE and args.script is None and not args.no_validate:
        _validate_config(config, req.overrides, req.world_size)
    return req


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dist-opt launch`` and ``python -m dist_opt.launch``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        script_args: list[str] = []
        if "--script" in argv and "--" in argv:  # a script's own arguments follow `--`
            cut = argv.index("--")
            argv, script_args = argv[:cut], argv[cut + 1 :]
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        args.script_args = script_args
        req = make_request(args)
        plan = BUILDERS[req.launcher](req)
        if args.dry_run:
            sys.stdout.write(render(plan, req.ssh, req.python, req.cwd))
            sys.stdout.flush()
            return 0
        _check_master_port(req)
        print(
            f"dist-opt launch: {plan.launcher}, {len(req.nodes)} node(s), world size {plan.world_size}"
            + (f", run id {req.run_id}" if req.launcher == "torchrun" else ""),
            file=sys.stderr,
            flush=True,
        )
        return Supervisor(plan, req.ssh, req.python, req.cwd, timeout=args.timeout).run()
    except (LaunchError, LaunchFailure) as e:
        for line in str(e).splitlines() or [type(e).__name__]:
            print(f"dist-opt launch: {line}", file=sys.stderr)
        return e.exit_code
