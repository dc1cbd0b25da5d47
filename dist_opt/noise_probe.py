"""B_simple on one rank: the micro-batches of gradient accumulation as the "small" batch.

Data parallelism gets two gradient sizes per step from the ranks (see :mod:`dist_opt.noise_scale`).
A single rank that accumulates ``accum`` micro-batches of ``micro`` samples has them too: each
micro-step's own gradient (over ``micro`` samples) is the small one, the accumulated mean (over
``micro x accum``) the big one. :class:`MicroBatchProbe` recovers each micro-step's gradient as the
difference of the accumulated ``p.grad`` before and after it (one flat copy per micro-step, so
meant for small models) and hands :meth:`NoiseScale.update` the same two squared norms the
multi-rank path does. It needs the gradients visible as ``p.grad`` between micro-steps, which holds
for the native engine at ZeRO stage 0/1 (``p.grad`` are views of its flat buffer); elsewhere
(stage 2 releases ``p.grad``) :func:`micro_probe` returns None and nothing is logged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dist_opt.noise_scale import NoiseScale


class MicroBatchProbe:
    """Per-step sums of squared micro-step gradient norms and the accumulated gradient's norm."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._prev: torch.Tensor | None = None
        self._sq = 0.0
        self.micro_steps = 0

    def _flat(self) -> torch.Tensor | None:
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            return None
        return torch.cat([g.detach().reshape(-1).double() for g in grads if g is not None])

    def after_micro_step(self) -> None:
        """Call after each micro-step's backward: folds in that micro-step's own gradient norm."""
        cur = self._flat()
        if cur is None:  # no gradient to read (e.g. released by the engine): this step is not measured
            self._prev, self.micro_steps = None, -1
            return
        if self.micro_steps < 0:
            return
        own = cur if self._prev is None else cur - self._prev
        self._sq += float(own.square().sum())
        self._prev = cur
        self.micro_steps += 1

    def take(self, loss_scale: float = 1.0) -> tuple[float, float] | None:
        """``(mean_k |g_k|^2, |mean_k g_k|^2)`` of the step just accumulated (None if not measurable),
        and reset for the next step. ``g_k`` is micro-step k's gradient of its mean loss."""
        n, prev, sq = self.micro_steps, self._prev, self._sq
        self._prev, self._sq, self.micro_steps = None, 0.0, 0
        if n < 2 or prev is None:
            return None
        s2 = loss_scale**2
        return sq / n / s2, float((prev / n).square().sum()) / s2


def micro_probe(cfg: Any, model: nn.Module, world: int, accum: int) -> MicroBatchProbe | None:
    """A probe when one rank must measure the noise scale itself: ``tracking.noise_scale`` and
    ``tracking.noise_scale_micro`` on, a world of one, gradient accumulation (>= 2 micro-steps) and
    ``p.grad`` kept between micro-steps (native engine, ZeRO stage 0/1)."""
    if not (cfg.tracking.noise_scale and cfg.tracking.noise_scale_micro) or world != 1 or accum < 2:
        return None
    if cfg.distributed.engine != "native" or cfg.distributed.zero_stage == 2:
        return None
    return MicroBatchProbe(model)


def noise_metrics(
    noise: NoiseScale | None,
    stats: dict[str, Any],
    probe: MicroBatchProbe | None,
    micro: int,
    global_batch: int,
    applied: bool,
) -> dict[str, float]:
    """Fold one optimizer step into ``noise`` and return ``{"noise/b_simple": ...}`` (empty if nothing
    was measured). Multi-rank: the engine's ``local_grad_sq`` / ``global_grad_sq`` stats; one rank:
    the probe's micro-step norms (``b_small = micro``)."""
    measured = probe.take(float(stats.get("loss_scale", 1.0))) if probe is not None else None
    if noise is None or not applied:
        return {}
    if measured is not None:
        noise.update(measured[0], measured[1], micro, global_batch)
    elif "local_grad_sq" in stats:
        b_small = micro * stats["local_micro_steps"]
        if b_small >= global_batch:
            return {}
        noise.update(stats["local_grad_sq"], stats["global_grad_sq"], b_small, global_batch)
    else:
        return {}
    return {} if noise.b_simple is None else {"noise/b_simple": noise.b_simple}
