"""Collectives used by the engine, with a ledger of what was sent (for tests and benchmarks).

``bytes`` in the ledger is the bandwidth-optimal traffic per rank of each collective
(ring algorithms): all-reduce 2(N-1)/N·S, reduce-scatter and all-gather (N-1)/N·S, where S
is the size of the full (unscattered / gathered) tensor.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class Ledger:
    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)

    def add(self, op: str, full_bytes: int, world: int) -> None:
        factor = {"all_reduce": 2.0, "reduce_scatter": 1.0, "all_gather": 1.0, "broadcast": 1.0}[op]
        self.calls[op] += 1
        self.bytes[op] += int(factor * (world - 1) / world * full_bytes) if world > 1 else 0

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


# torch >= 2.13 renamed the single-tensor collectives (the old names warn); keep both working
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Comm:
    """Thin wrapper over torch.distributed for one process group. The collectives return the
    ``Work`` handle when ``async_op`` is set, else None (always None on one rank)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.enabled = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(group) if self.enabled else 1
        self.rank = dist.get_rank(group) if self.enabled else 0
        self.ledger = Ledger()

    def all_reduce(self, t: torch.Tensor, async_op: bool = False) -> dist.Work | None:
        """Sum over ranks (never AVG: averaging is done by the caller, once)."""
        if self.world == 1:
            return None
        self.ledger.add("all_reduce", t.numel() * t.element_size(), self.world)
        return dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group, async_op=async_op)

    def reduce_scatter(
        self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False
    ) -> dist.Work | None:
        if self.world == 1:
            out.copy_(inp)
            return None
        self.ledger.add("reduce_scatter", inp.numel() * inp.element_size(), self.world)
        return _reduce_scatter_single(out, inp, op=dist.ReduceOp.SUM, group=self.group, async_op=async_op)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False) -> dist.Work | None:
        if self.world == 1:
            out.copy_(inp)
            return None
        self.ledger.add("all_gather", out.numel() * out.element_size(), self.world)
        return _all_gather_single(out, inp, group=self.group, async_op=async_op)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> None:
        if self.world == 1:
            return
        self.ledger.add("broadcast", t.numel() * t.element_size(), self.world)
        dist.broadcast(t, src=src, group=self.group)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Blocking in-place sum; returns t (a no-op on one rank)."""
        self.all_reduce(t)
        return t
