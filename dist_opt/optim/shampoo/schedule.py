"""When each Shampoo block refreshes its inverse roots: staggered phases (pure functions).

Every matrix block refreshes on the first preconditioned step ``start`` (so preconditioning
begins with real roots everywhere), and afterwards on the steps ``t > start`` with
``(t - start) % frequency == phase``. The phases spread the refresh work over the ``frequency``
steps of a period instead of paying all eigendecompositions on one step: blocks are placed,
largest root cost first (ties: by block key), into the phase with the least root cost so far (ties: the lowest
phase), so no step carries more than ``total / frequency + largest block`` of root work — with
equal blocks at most ``ceil(blocks / frequency)`` refreshes per step. When fewer phases than
``frequency`` are used, the used ones are spaced evenly over the period (refresh steps alternate
with ordinary ones rather than bunching at its start).

The phases depend only on the block keys and shapes and the frequency, never on the world
size or the ranks, so a run resumed at another world size keeps the same schedule and the same
arithmetic; nothing about the schedule needs to be checkpointed.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence


def refresh_phases(root_costs: Mapping[str, float], frequency: int) -> dict[str, int]:
    """Phase in ``[0, frequency)`` of each block (by block key); blocks without roots (cost 0) get
    phase 0. Ties in cost are broken by the key, so the result does not depend on plan order."""
    f = max(1, int(frequency))
    phases = dict.fromkeys(root_costs, 0)
    heap = [(0.0, p) for p in range(f)]
    for key in sorted(root_costs, key=lambda k: (-root_costs[k], k)):
        if root_costs[key] <= 0:
            continue
        load, p = heapq.heappop(heap)
        phases[key] = p
        heapq.heappush(heap, (load + root_costs[key], p))
    used = sorted({phases[k] for k in phases if root_costs[k] > 0})
    spread = {p: k * f // len(used) for k, p in enumerate(used)}  # fewer blocks than steps: evenly spaced
    return {k: spread[p] if root_costs[k] > 0 else 0 for k, p in phases.items()}


def refreshes_at(step: int, phase: int, start: int, frequency: int) -> bool:
    """Whether a block of this phase recomputes its roots at ``step``."""
    if step < start:
        return False
    return step == start or (step - start) % max(1, int(frequency)) == phase


def phase_loads(root_costs: Sequence[float], phases: Sequence[int], frequency: int) -> list[float]:
    """Root work per phase (the refresh cost each step of a period pays after the first)."""
    out = [0.0] * max(1, int(frequency))
    for c, p in zip(root_costs, phases, strict=True):
        out[p] += c
    return out
