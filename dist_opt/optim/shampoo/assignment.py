"""Which rank owns which Shampoo block: a cost model and greedy longest-processing-time balancing.

Costs are in flop-equivalents of one optimizer step. For a block with dims d_1..d_k and N
elements (a 2-D m×n block: N = m·n):

- per step: statistics Σ_i d_i·N multiply-adds plus preconditioning Σ_i d_i·N, i.e.
  4·N·Σ_i d_i flops (= 4·m·n·(m+n) for 2-D), plus ~``ELEMENTWISE`` flops per element
  (momentum, graft, norms, weight decay);
- per root refresh: ``ROOT_FLOPS``·Σ_i d_i³ (eigendecomposition plus Q·diag·Qᵀ, = c·(m³+n³)),
  amortized over ``precondition_frequency`` steps.

Diagonal (graft-only) blocks cost ``ELEMENTWISE``·N. The assignment is a pure function of the
block shapes, the frequency and the world size, so every rank computes the same one.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

ELEMENTWISE = 20.0
ROOT_FLOPS = 12.0


def step_cost(shape: Sequence[int], diagonal: bool = False) -> float:
    """Flop-equivalents of one ordinary step of a block."""
    n = math.prod(shape)
    if diagonal:
        return ELEMENTWISE * n
    return 4.0 * n * sum(shape) + ELEMENTWISE * n


def root_cost(shape: Sequence[int], diagonal: bool = False) -> float:
    """Flop-equivalents of refreshing a block's inverse roots (0 for diagonal blocks)."""
    return 0.0 if diagonal else ROOT_FLOPS * sum(float(d) ** 3 for d in shape)


def block_cost(shape: Sequence[int], diagonal: bool, precondition_frequency: int) -> float:
    """Amortized per-step cost: step cost + root cost / frequency."""
    return step_cost(shape, diagonal) + root_cost(shape, diagonal) / max(1, precondition_frequency)


def assign(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each item: largest cost first, each to the least-loaded rank (ties: lowest rank)."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    owners = [0] * len(costs)
    heap = [(0.0, r) for r in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owners


def loads(costs: Sequence[float], owners: Sequence[int], world: int) -> list[float]:
    """Total cost per rank."""
    out = [0.0] * world
    for c, r in zip(costs, owners, strict=True):
        out[r] += c
    return out


def imbalance(costs: Sequence[float], owners: Sequence[int], world: int) -> float:
    """max rank load / mean rank load (1.0 is perfect)."""
    per = loads(costs, owners, world)
    mean = sum(per) / world
    return max(per) / mean if mean > 0 else 1.0
