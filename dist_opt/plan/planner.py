"""Candidate (global batch, GPU count) pairs: steps, step time, time and cost to target.

For each candidate, steps to target relative to the probe's batch B0 come from the noise scale
(``S(B)/S(B0)``, :func:`dist_opt.noise_scale.relative_steps`), the step time from
:func:`dist_opt.plan.step_model.step_time`. Time to target ∝ steps × step time, cost (GPU-hours) ∝
time × GPUs; both relative to a reference candidate (B0 on the fewest GPUs when that fits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dist_opt.noise_scale import relative_steps
from dist_opt.plan.fabric import CostModel
from dist_opt.plan.step_model import StepTime, Workload, layout, step_time


@dataclass(frozen=True)
class Candidate:
    batch: int
    gpus: int
    nodes: int
    rel_steps: float
    step: StepTime
    rel_time: float = 1.0
    rel_cost: float = 1.0


def default_batches(base_batch: int) -> list[int]:
    """B0 × 2^k for k = -2..8 (whole numbers only)."""
    out = [base_batch * 2**k for k in range(0, 9)]
    out = [base_batch // d for d in (4, 2) if base_batch % d == 0 and base_batch // d >= 1] + out
    return sorted(set(out))


def candidates(
    work: Workload,
    mode: str,
    base_batch: int,
    b_noise: float,
    batches: Sequence[int],
    gpus: Sequence[int],
    cm: CostModel,
) -> list[Candidate]:
    """All runnable pairs (a whole number >= 1 of samples per GPU), by GPU count then batch; the
    reference (rel_time = rel_cost = 1) is B0 on the fewest GPUs when runnable, else the first row."""
    rows: list[Candidate] = []
    for g in sorted(set(gpus)):
        nodes, _ = layout(g, cm.gpus_per_node)
        for b in sorted(set(batches)):
            if b < g or b % g:
                continue
            st = step_time(mode, work, b, g, cm)
            rows.append(Candidate(b, g, nodes, relative_steps(b, base_batch, b_noise), st))
    if not rows:
        return rows
    g0 = min(gpus)
    ref = next((r for r in rows if r.batch == base_batch and r.gpus == g0), rows[0])
    t_ref = ref.rel_steps * ref.step.total_s
    return [
        Candidate(
            r.batch,
            r.gpus,
            r.nodes,
            r.rel_steps,
            r.step,
            rel_time=r.rel_steps * r.step.total_s / t_ref,
            rel_cost=r.rel_steps * r.step.total_s * r.gpus / (t_ref * ref.gpus),
        )
        for r in rows
    ]


def reference(rows: Sequence[Candidate]) -> Candidate:
    """The row every ``×`` is relative to."""
    return next(r for r in rows if r.rel_time == 1.0 and r.rel_cost == 1.0)


def recommend(rows: Sequence[Candidate], max_cost_ratio: float = 2.0) -> Candidate:
    """The fastest candidate whose cost is at most ``max_cost_ratio`` × the cheapest one's."""
    cheapest = min(r.rel_cost for r in rows)
    ok = [r for r in rows if r.rel_cost <= max_cost_ratio * cheapest]
    return min(ok, key=lambda r: (r.rel_time, r.rel_cost))
