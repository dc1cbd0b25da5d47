"""dist-opt: multi-node, large-batch data-parallel training with sharded optimizer state.

The public API (everything the README shows is importable from here)::

    import dist_opt

    task = dist_opt.DatasetTask(make_model, train_dataset, eval_dataset)
    summary = dist_opt.fit("config.yaml", task, overrides=["optimizer.name=lamb"])

- :func:`fit` -- train a config (YAML path, dict or :class:`Config`) with the full trainer
  (checkpoints and resume, SWA, W&B, preemption) under any launcher, or as a world of one.
- :class:`Task` -- what the trainer needs from a model + data; :class:`DatasetTask` wraps a
  model factory and a map-style ``torch.utils.data.Dataset``.
- :class:`Config`, :func:`load_config`, :class:`ConfigError` -- the validated configuration.
- :class:`ShardedOptimizer` -- the ZeRO-style sharded optimizer as a ``torch.optim.Optimizer``.
- :class:`Summary` -- what a run returns; :data:`__version__`.

Names are loaded on first use, so ``import dist_opt`` (and the launcher, which never needs
torch) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dist_opt._version import __version__

if TYPE_CHECKING:
    from dist_opt.api import fit
    from dist_opt.config import Config, ConfigError, load_config
    from dist_opt.engine.sharded import ShardedOptimizer
    from dist_opt.outcome import Summary
    from dist_opt.tasks.base import Task
    from dist_opt.tasks.dataset import DatasetTask

__all__ = [
    "Config",
    "ConfigError",
    "DatasetTask",
    "ShardedOptimizer",
    "Summary",
    "Task",
    "__version__",
    "fit",
    "load_config",
]

_WHERE = {
    "Config": "dist_opt.config",
    "ConfigError": "dist_opt.config",
    "load_config": "dist_opt.config",
    "DatasetTask": "dist_opt.tasks.dataset",
    "ShardedOptimizer": "dist_opt.engine.sharded",
    "Summary": "dist_opt.outcome",
    "Task": "dist_opt.tasks.base",
    "fit": "dist_opt.api",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'dist_opt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
