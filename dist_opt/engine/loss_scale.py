"""Loss scaling for fp16 compute: the scale, its dynamic update rule and its checkpoint state.

fp16 has a narrow exponent range, so small gradients underflow to zero. The trainer multiplies the
loss by :attr:`LossScaler.scale` before backward; the engine divides the reduced gradients by the
same scale (folded into its sum-then-divide averaging) before the update. A non-finite gradient norm
(detected by the engine's one small all-reduce, so every rank agrees) skips the step; the dynamic
rule then halves the scale, and doubles it after ``growth_interval`` consecutive applied steps
(initial scale 2**16, as ``torch.amp.GradScaler``). A static scale never changes.

``torch.amp.GradScaler`` cannot be used with the native engine: at ZeRO-2 gradients never stay on
``p.grad`` (they are reduce-scattered into this rank's shard during backward), so the scaler's
unscale/inf check would see nothing. Set ``precision.loss_scale`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["INITIAL_SCALE", "LossScaler"]

INITIAL_SCALE = 2.0**16


class LossScaler:
    """The loss scale (dynamic, or static when ``static`` is a number). Pure logic, no collectives:
    :meth:`update` is given the step's outcome, which the engine already agreed on over all ranks."""

    def __init__(
        self,
        static: float | None = None,
        *,
        init_scale: float = INITIAL_SCALE,
        growth_interval: int = 2000,
        min_scale: float = 1.0,
    ) -> None:
        if static is not None and not static > 0:
            raise ValueError(f"a static loss scale must be > 0, got {static}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        self.dynamic = static is None
        self.scale = float(init_scale if static is None else static)
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.clean_steps = 0  # applied steps since the last change of the scale
        self.overflows = 0

    def update(self, applied: bool) -> None:
        """After a step: ``applied`` False (non-finite gradients) halves a dynamic scale; the
        ``growth_interval``-th consecutive applied step doubles it."""
        if not self.dynamic:
            return
        if not applied:
            self.overflows += 1
            self.clean_steps = 0
            self.scale = max(self.scale / 2.0, self.min_scale)
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= 2.0
            self.clean_steps = 0

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (a checkpoint stores it with the optimizer's counters)."""
        return {k: getattr(self, k) for k in ("scale", "clean_steps", "overflows", "dynamic")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state.get("clean_steps", 0))
        self.overflows = int(state.get("overflows", 0))


def refuse_grad_scaler() -> None:
    """Raise: ``torch.amp.GradScaler`` does not see the native engine's gradients."""
    raise TypeError(
        "torch.amp.GradScaler does not work with dist-opt's ShardedOptimizer (gradients are reduced "
        "into flat buffers / this rank's shard, not left on p.grad); use precision.loss_scale "
        "(ShardedOptimizer(..., loss_scale=LossScaler()))"
    )
