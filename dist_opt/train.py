"""The training entry point: ``python -m dist_opt.train CONFIG [dotted.key=value ...]``.

Under torchrun / deepspeed / mpirun / srun every process joins the group described by its
launcher's environment. With no launcher and ``distributed.nproc > 1`` it starts the ranks
itself through torchrun's Python API (standalone rendezvous on a free port).

Exit codes: 0 done, 1 failure, 2 bad input (config, launcher environment), 3 stopped because
of too many consecutive non-finite steps, 4 stopped early on request (preemption signal) after
saving a checkpoint.

This module is only the command line: the loop is :class:`dist_opt.trainer.Trainer` (also importable
from here, as are ``Summary``, ``StopRun``, ``NonFiniteStorm`` and the exit codes), and the Python
entry for users' own tasks is :func:`dist_opt.api.fit`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from dist_opt.config import Config, ConfigError, dump_yaml, load_config
from dist_opt.dist.env import LaunchEnvError, detect
from dist_opt.dist.group import destroy_process_group, init_process_group
from dist_opt.outcome import (  # noqa: F401 - re-exported: these names were importable from here
    EXIT_BAD_INPUT,
    EXIT_FAIL,
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_STOPPED,
    NonFiniteStorm,
    StopRun,
    Summary,
)
from dist_opt.trainer import Trainer, build_extensions  # noqa: F401 - re-exported


class _ArgParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2 instead of a usage dump
        raise ConfigError([f"dist-opt train: {message} (usage: dist-opt train CONFIG [key=value ...])"])


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = _ArgParser(prog="dist-opt train", description="Train a dist-opt config.", allow_abbrev=False)
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(list(argv))


def validate_for_world(cfg: Config, world: int, check_out_dir: bool = False) -> None:
    """Raise ConfigError for problems that show before any rank starts; ``check_out_dir``: also an
    unusable ``run.out_dir`` (the process that starts the ranks, or a world of one, checks it)."""
    from dist_opt.integrations import check_engine
    from dist_opt.run_dir import run_dir_problem
    from dist_opt.tasks import check_task  # imports a task given by import path: fails before ranks start

    problems = cfg.check_world(world) + check_engine(cfg, world) + check_task(cfg.task)
    if check_out_dir and (problem := run_dir_problem(cfg.run.out_dir)) is not None:
        problems.append(problem)
    if problems:
        raise ConfigError(problems)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return EXIT_OK
        env = detect(os.environ)
        world = env.world_size if env.is_launched else cfg.distributed.nproc
        validate_for_world(cfg, world, check_out_dir=not env.is_launched)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_BAD_INPUT
    except LaunchEnvError as e:
        print(f"launch error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not env.is_launched and cfg.distributed.nproc > 1:
        return spawn_local(args.config, args.overrides, cfg.distributed.nproc, cfg.train.preemption_signals)
    return run(cfg, env)


def spawn_local(config: str, overrides: Sequence[str], nproc: int, signals: Sequence[str] = ()) -> int:
    """Start ``nproc`` ranks of ``python -m dist_opt.train CONFIG OVERRIDES`` on this machine with
    torchrun's Python API (standalone, free port); returns the exit code (see :func:`spawn_ranks`)."""
    return spawn_ranks(["--module", "dist_opt.train", config, *overrides], nproc, signals)


def spawn_ranks(program: Sequence[str], nproc: int, signals: Sequence[str] = ()) -> int:
    """Start ``nproc`` local ranks of ``program`` (torchrun's program arguments: ``SCRIPT ARGS`` or
    ``--module MODULE ARGS``) with torchrun's Python API; returns the exit code of the whole.

    Signals to this process (SIGTERM, SIGINT, ``train.preemption_signals``) are forwarded to the
    ranks by torchrun; the ranks stop, save and exit 4, which is then this process's exit code. Once
    every rank has recorded how it ended (:func:`dist_opt.faults.record_exit_status`), that outcome is
    the exit code whatever arrives afterwards (a late signal, torchrun killing finished ranks).
    """
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args as torchrun_args
    from torch.distributed.run import run as torchrun

    from dist_opt.faults import ENV_EXIT_STATUS_DIR, read_exit_statuses, signal_by_name

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ.setdefault("LOGLEVEL", "WARNING")
    forward = ["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"]
    forward += [s for s in (signal_by_name(n).name for n in signals) if s not in forward]
    targs = torchrun_args(
        [
            "--standalone",
            f"--nproc-per-node={nproc}",
            "--max-restarts=0",
            f"--signals-to-handle={','.join(forward)}",
            *program,
        ]
    )
    with tempfile.TemporaryDirectory(prefix="dist-opt-exit-") as status_dir:
        os.environ[ENV_EXIT_STATUS_DIR] = status_dir
        try:
            torchrun(targs)
        except ChildFailedError as e:
            # a rank killed by torchrun after it had finished (its code is recorded) counts with that code
            codes = {rank: f.exitcode for rank, f in e.failures.items()} | read_exit_statuses(status_dir)
            settled = ranks_outcome(read_exit_statuses(status_dir), nproc)
            if settled == EXIT_OK:  # every rank recorded success: a later kill changes nothing
                return settled
            if set(codes.values()) in ({EXIT_NONFINITE}, {EXIT_STOPPED}, {EXIT_BAD_INPUT}):
                return next(iter(codes.values()))  # rank 0 has said why
            print(f"dist-opt: rank(s) failed with exit codes {dict(sorted(codes.items()))}", file=sys.stderr)
            return next(iter(codes.values()), EXIT_FAIL) if len(set(codes.values())) == 1 else EXIT_FAIL
        except SignalException as e:  # torchrun forwarded the signal and waited for the ranks
            codes = read_exit_statuses(status_dir)
            settled = ranks_outcome(codes, nproc)
            if settled is not None:  # the signal came after every rank had ended: their outcome stands
                return settled
            print(
                f"dist-opt: {e.sigval.name}: ranks ended with exit codes {codes or 'unknown'}",
                file=sys.stderr,
            )
            return 128 + int(e.sigval)
        finally:
            os.environ.pop(ENV_EXIT_STATUS_DIR, None)
    return EXIT_OK


def ranks_outcome(codes: dict[int, int], nproc: int) -> int | None:
    """The launcher's exit code when every one of ``nproc`` ranks recorded the same exit code (0: done,
    4: stopped and saved, ...), whatever happened to the processes afterwards; None otherwise."""
    if len(codes) != nproc or len(set(codes.values())) != 1:
        return None
    return next(iter(codes.values()))


def run(cfg: Config, env: Any) -> int:
    """Train in the group described by ``env``; returns the exit code (see the module docstring)."""
    from dist_opt import faults

    device = init_process_group(env, cfg.distributed.backend, cfg.distributed.timeout_s)
    try:
        code = _fit(cfg, device, env.rank)
        # recorded before teardown: the launcher may kill this rank once another one has exited
        return faults.record_exit_status(env.rank, code)
    finally:
        faults.release()
        destroy_process_group()


def _fit(cfg: Config, device: torch.device, rank: int) -> int:
    from dist_opt.diagnose import explain

    try:
        Trainer(cfg, device).fit()
    except (NonFiniteStorm, StopRun) as e:
        if rank == 0:
            print(stop_message(e), file=sys.stderr)
        return e.exit_code
    except ConfigError as e:
        if rank == 0:
            print(e, file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"dist-opt: rank {rank}: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:  # a failed collective or write (DCP raises BaseException): one clear line
        line = explain(e, rank, cfg.run.out_dir)
        if line is None:
            raise
        print(line, file=sys.stderr, flush=True)
        return EXIT_FAIL
    return EXIT_OK


def stop_message(e: NonFiniteStorm | StopRun) -> str:
    """The line rank 0 prints when a run ends early (the CLI's exit code is ``e.exit_code``)."""
    if isinstance(e, NonFiniteStorm):
        return (
            f"dist-opt: {e} (lower optimizer.lr or set optimizer.max_grad_norm; resume=latest continues "
            "from the last checkpoint)"
        )
    return f"dist-opt: stopped early ({e}); resume with resume=latest"


if __name__ == "__main__":
    exit_code = main()
    # A rank's work is done and flushed here (tracker closed, checkpoints complete, group destroyed).
    # Leave without the interpreter's teardown: destroying gloo's C++ threads there can abort a
    # finished rank ("terminate called without an active exception", exit -6) now and then.
    mpi = sys.modules.get("mpi4py.MPI")  # mpirun ranks: finalize MPI ourselves (its atexit hook is skipped)
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
