"""Held-out evaluation, split over ranks: every rank scores every world-th sample, then one all-reduce."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch import nn

    from dist_opt.tasks.base import Task

EVAL_BATCH = 256


@torch.no_grad()
def evaluate(
    task: Task, model: nn.Module, rank: int, world: int, max_samples: int | None = None
) -> dict[str, float]:
    """``eval/loss`` (and ``eval/accuracy`` if the task has one) over the first ``max_samples`` held-out
    samples (all when None). Collective: every rank calls it; every rank gets the same result."""
    n = task.eval_size
    if max_samples is not None:
        n = min(n, max_samples)
    mine = torch.arange(rank, n, world)
    sums = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
    for lo in range(0, len(mine), EVAL_BATCH):
        out = task.eval_sums(model, task.eval_batch(mine[lo : lo + EVAL_BATCH]))
        for k in sums:
            sums[k] += out.get(k, 0.0)
    vec = torch.tensor([sums["loss_sum"], sums["count"], sums["correct"]], dtype=torch.float64)
    dist.all_reduce(vec)
    res = {"eval/loss": float(vec[0] / vec[1])}
    if task.has_accuracy:
        res["eval/accuracy"] = float(vec[2] / vec[1])
    return res
