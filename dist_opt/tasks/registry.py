"""``task.name`` -> a :class:`Task`: the built-in tasks by name, and your own by import path.

``task.name: my_pkg.my_module:build`` names either a :class:`Task` subclass or a callable that
returns a Task. Either is called with ``(task_config, seed)`` - the validated ``task`` section
(your settings live in ``task_config.options``) and ``run.seed`` - or with fewer arguments when
its signature takes fewer: ``(task_config)`` or ``()``.

The module is imported in the process that validates the config (``dist-opt train`` checks it
before any rank starts, see :func:`check_task`) and again in every rank. The current working
directory is put at the front of ``sys.path`` first, as ``python -m`` does, so a module next to
the config file works whether the ranks were started by ``dist-opt train``, ``python -m
dist_opt.train`` or a launcher that keeps the working directory; anything else must be
installed or on ``PYTHONPATH`` on every node.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dist_opt.config.loader import ConfigError
from dist_opt.tasks.base import Task

if TYPE_CHECKING:
    from dist_opt.config.schema import DataConfig, TaskConfig

TASKS: dict[str, str] = {
    "stdlib_lm": "dist_opt.tasks.stdlib_lm:StdlibLMTask",
    "digits": "dist_opt.tasks.digits:DigitsTask",
    "synthetic": "dist_opt.tasks.synthetic:SyntheticTask",
}
"""Task name -> "module:class" of its implementation (the same names as the schema's BUILTIN_TASKS)."""

TaskFactory = Callable[..., Task]


class TaskNameError(ConfigError, ValueError):
    """``task.name`` cannot be turned into a Task (unknown, not importable, not a Task); one line."""

    def __init__(self, problem: str):
        super().__init__([problem])


def _first_line(e: BaseException) -> str:
    """The first line of ``e``'s message; prefixed with its type unless it is an import/attribute error."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    if isinstance(e, ImportError | AttributeError) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _cwd_on_path() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def resolve_task(name: str) -> type[Task] | TaskFactory:
    """The Task subclass or factory that ``name`` (a built-in name or ``module:attribute``) refers to.

    Raises :class:`TaskNameError` (a ``ConfigError``) with one line, e.g.
    ``task.name: cannot import 'x.y:Z': No module named 'x'``."""
    builtin = TASKS.get(name)
    if builtin is None and ":" not in name:
        raise TaskNameError(
            f"task.name: unknown task {name!r} (choose from {', '.join(sorted(TASKS))} "
            "or give an import path 'package.module:attribute')"
        )
    module_name, _, attr = (builtin or name).partition(":")
    if builtin is None:
        _cwd_on_path()
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # the user's module may fail in any way while importing
        raise TaskNameError(f"task.name: cannot import {name!r}: {_first_line(e)}") from e
    if isinstance(obj, type):
        if not issubclass(obj, Task):
            raise TaskNameError(f"task.name: {name!r} is not a Task subclass or a callable returning one")
        if inspect.isabstract(obj):
            missing = ", ".join(sorted(obj.__abstractmethods__))
            raise TaskNameError(f"task.name: {name!r} is an abstract Task (it does not implement {missing})")
    elif not callable(obj):
        raise TaskNameError(
            f"task.name: {name!r} is not a Task subclass or a callable returning one "
            f"(it is a {type(obj).__name__})"
        )
    return obj


def _arguments(factory: Callable[..., Any], cfg: TaskConfig, seed: int, name: str) -> tuple[Any, ...]:
    """``(cfg, seed)``, ``(cfg,)`` or ``()``: the longest that ``factory``'s signature accepts."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature (some builtins): pass both
        return cfg, seed
    for args in ((cfg, seed), (cfg,), ()):
        try:
            sig.bind(*args)
        except TypeError:
            continue
        return args
    raise TaskNameError(
        f"task.name: {name!r} must accept (task_config, seed), (task_config) or no arguments "
        f"(its signature is {sig})"
    )


def build_task(cfg: TaskConfig, seed: int) -> Task:
    """The task named ``cfg.name``, built from ``cfg`` and the run seed."""
    factory = resolve_task(cfg.name)
    task = factory(*_arguments(factory, cfg, seed, cfg.name))
    if not isinstance(task, Task):
        raise TaskNameError(f"task.name: {cfg.name!r} returned a {type(task).__name__}, not a Task")
    return task


def check_task(cfg: TaskConfig) -> list[str]:
    """Problems with ``task.name`` found without building the task: [] for a built-in name or an
    importable Task subclass / callable, else one line (for the config checks before ranks start)."""
    if cfg.name in TASKS:
        return []
    try:
        resolve_task(cfg.name)
    except TaskNameError as e:
        return e.problems
    return []


def configure_loader(task: Task, data: DataConfig, seed: int) -> None:
    """Hand the ``data.*`` loader settings and the run seed to a task that reads through a DataLoader
    (one with a ``configure_loader(data, seed)`` method, e.g. DatasetTask); a no-op for the others.
    The trainer calls it once, right after the task is built or given and before ``build_model``."""
    hook = getattr(task, "configure_loader", None)
    if callable(hook):
        hook(data, seed)
