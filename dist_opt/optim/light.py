"""``torch.optim.Optimizer`` without the lazy ``torch._dynamo`` import of ``add_param_group``.

torch guards ``Optimizer.add_param_group`` against torch.compile with a wrapper that imports
``torch._dynamo`` on its first call: more than a second of CPU in every process that builds an
optimizer. dist-opt's optimizers are never compiled, so they call the wrapped function directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["LightOptimizer", "ShadowOptimizer"]

_ADD_PARAM_GROUP = getattr(
    torch.optim.Optimizer.add_param_group, "__wrapped__", torch.optim.Optimizer.add_param_group
)


class LightOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose ``add_param_group`` is torch's own, unguarded."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _ADD_PARAM_GROUP(self, param_group)


class ShadowOptimizer(LightOptimizer):
    """Param groups (one 1-element tensor each) whose ``lr`` torch's LR schedulers write; ``step``
    does nothing. Lets dist-opt drive torch's schedulers without a real optimizer behind them."""

    def __init__(self, lrs: list[float]):
        groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": float(lr)} for lr in lrs]
        super().__init__(groups, {"lr": float(lrs[0])})

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Nothing to update; a closure is evaluated as torch's optimizers do."""
        return closure() if closure is not None else None
