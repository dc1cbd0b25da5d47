"""Train your own model from Python: ``fit(config, task=None, overrides=()) -> Summary``.

``task`` is an instance of a :class:`dist_opt.tasks.base.Task` subclass (model, data as a pure
function of sample indices, loss, evaluation); without it the built-in task ``task.name`` is
trained. Everything else is the same as ``dist-opt train``: the same :class:`Trainer` with
checkpoints and ``resume``, SWA, tracking and preemption handling, configured the same way.

How the ranks start:

* under a launcher (torchrun, deepspeed, mpirun/mpiexec, srun: see :mod:`dist_opt.dist.env`) every
  process of the user's script calls ``fit`` and joins the group its launcher describes;
* with a process group that the caller already initialised, ``fit`` trains in it (and leaves it);
* with neither, ``distributed.nproc = 1`` trains as a world of one in this process, and
  ``distributed.nproc = N > 1`` starts N local ranks with torchrun's Python API that re-run *this
  script* (``sys.argv``; ``python -m module`` re-runs the module) -- each of them then reaches
  ``fit`` under that launcher. The calling process is only the launcher: once the ranks are done it
  exits with their exit code (``SystemExit``), so the code after ``fit`` runs in the ranks only.
  From an interactive session there is no script to re-run: a :class:`ConfigError` says to use
  ``torchrun``.

``fit`` returns the :class:`Summary` on every rank (the evaluation is all-reduced; rank 0 also
wrote ``final_params.pt`` and ``summary.json`` into ``run.out_dir``). A bad config raises
:class:`ConfigError` (one line per problem, naming the key) before anything starts. A run that
ends early raises :class:`StopRun` (a preemption signal; a checkpoint was saved: rerun with
``resume=latest``) or :class:`NonFiniteStorm`; both carry the CLI's ``exit_code``
(``sys.exit(e.exit_code)`` ends a script as ``dist-opt train`` would).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from dist_opt.config import Config, ConfigError, load_config
from dist_opt.config.loader import apply_overrides, validate
from dist_opt.dist.env import detect
from dist_opt.outcome import NonFiniteStorm, StopRun, Summary
from dist_opt.tasks.base import Task
from dist_opt.trainer import Trainer

__all__ = ["ConfigError", "NonFiniteStorm", "StopRun", "Summary", "Task", "fit", "resolve_config"]

ConfigLike = str | os.PathLike | Mapping[str, Any] | Config
_NOT_A_SCRIPT = ("pytest", "ipykernel_launcher", "ipykernel", "IPython")  # main modules never re-run


def resolve_config(config: ConfigLike, overrides: Sequence[str] = ()) -> Config:
    """A validated :class:`Config` from a YAML path, a dict of sections, or a ``Config``, with dotted
    ``key=value`` overrides applied as on the command line. Raises :class:`ConfigError`."""
    if isinstance(overrides, str):
        raise ConfigError(
            [f"overrides: expected a sequence of key=value strings, got the string {overrides!r}"]
        )
    if isinstance(config, Config):
        if not overrides:
            return config.model_copy(deep=True)  # fit may name the task in it: never the caller's object
        return validate(apply_overrides(config.model_dump(mode="json", by_alias=True), overrides))
    if isinstance(config, Mapping):
        return validate(apply_overrides(dict(config), overrides))
    if isinstance(config, str | os.PathLike):
        return load_config(config, overrides)
    raise ConfigError([f"config: expected a YAML file path, a dict or a Config, got {type(config).__name__}"])


def fit(config: ConfigLike, task: Task | None = None, overrides: Sequence[str] = ()) -> Summary:
    """Train ``task`` (or the built-in ``task.name``) with ``config``; see the module docstring."""
    from dist_opt.train import spawn_ranks, validate_for_world

    cfg = resolve_config(config, overrides)
    if task is not None and not isinstance(task, Task):
        raise TypeError(f"task: expected a dist_opt.tasks.base.Task instance, got {type(task).__name__}")
    env = detect(os.environ)
    joined = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if joined else env.world_size if env.is_launched else cfg.distributed.nproc
    validate_for_world(cfg, world)
    if task is not None:
        _record_task_name(cfg, task)
    if not joined and not env.is_launched and world > 1:
        program = _this_program(world)
        raise SystemExit(spawn_ranks(program, world, cfg.train.preemption_signals))
    return _fit_in_group(cfg, env, task, joined)


def _record_task_name(cfg: Config, task: Task) -> None:
    """Name the given task in the config (``config.yaml``, checkpoint manifests: a resume with another
    task class is then refused) as ``module:Class`` when it has such a name, instead of the default."""
    from dist_opt.config.schema import TASK_IMPORT_PATH

    name = f"{type(task).__module__}:{type(task).__qualname__}"
    if TASK_IMPORT_PATH.fullmatch(name):
        cfg.task.name = name


def _fit_in_group(cfg: Config, env: Any, task: Task | None, joined: bool) -> Summary:
    from dist_opt import faults
    from dist_opt.dist.group import destroy_process_group, init_process_group
    from dist_opt.train import stop_message

    device = init_process_group(env, cfg.distributed.backend, cfg.distributed.timeout_s)  # no-op if joined
    rank = dist.get_rank()
    try:
        return Trainer(cfg, device, task=task).fit()
    except (NonFiniteStorm, StopRun) as e:
        if rank == 0:
            print(stop_message(e), file=sys.stderr, flush=True)
        faults.record_exit_status(rank, e.exit_code)  # for a launching fit(): how this rank ended
        raise
    finally:
        faults.release()
        if not joined:
            destroy_process_group()


def _this_program(nproc: int) -> list[str]:
    """torchrun's program arguments that re-run the running script (or ``python -m`` module)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None) or ""
    script = sys.argv[0] if sys.argv else ""
    hint = (
        f"distributed.nproc: {nproc} ranks need a script to re-run, and this process has none "
        f"(interactive, -c or a test runner); start your script with `torchrun --nproc-per-node {nproc} "
        f"script.py` (or another launcher), or set distributed.nproc=1"
    )
    if hasattr(sys, "ps1") or name.split(".")[0] in _NOT_A_SCRIPT or Path(script).stem in _NOT_A_SCRIPT:
        raise ConfigError([hint])
    if name and name != "__main__":
        return ["--module", name.removesuffix(".__main__"), *sys.argv[1:]]
    if not script or script == "-c" or not Path(script).is_file():
        raise ConfigError([hint])
    return [script, *sys.argv[1:]]
