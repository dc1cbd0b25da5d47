"""Pure layout math: where each parameter lives in the flat buffers and which rank owns what.

Every parameter is flattened and split into ``world`` equal chunks of ``ceil(numel / world)``
elements (the FSDP2 / ``torch.chunk`` layout of a 1-D tensor): rank r owns elements
``[r*c, min((r+1)*c, numel))``. So every layer is split across all ranks (per-layer norms are
always partial sums), state per rank is ~1/world (+ < world elements of padding per tensor), and
a rank's piece of a parameter is exactly the DTensor ``Shard(0)`` local shard of the flattened
parameter, which is what makes checkpoints reshardable.

Buffers (all 1-D):
  full  (param-major, each parameter padded to c*world): replicated params and, in stages 0/1, grads.
  shard (rank-local, concatenation of this rank's chunks): optimizer state, stage-2 grads.
Parameters are laid out in reverse registration order, which approximates the order in which
backward produces their gradients, so buckets fill front to back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from math import prod


@dataclass(frozen=True)
class Slot:
    index: int  # position in the layout (0 = first in the flat buffers)
    name: str
    shape: tuple[int, ...]
    numel: int
    chunk: int  # elements per rank (ceil(numel / world))
    full_offset: int  # start in the full buffer; the padded extent is chunk * world
    shard_offset: int  # start in every rank's shard buffer

    def valid(self, rank: int) -> int:
        """How many of rank's ``chunk`` elements are real (the rest is zero padding)."""
        return max(0, min(self.chunk, self.numel - rank * self.chunk))

    def global_offset(self, rank: int) -> int:
        return min(rank * self.chunk, self.numel)


@dataclass(frozen=True)
class Bucket:
    slots: tuple[int, ...]  # layout indices, contiguous
    full_start: int
    full_end: int
    shard_start: int
    shard_end: int

    @property
    def shard_numel(self) -> int:
        return self.shard_end - self.shard_start


@dataclass
class Layout:
    world: int
    slots: list[Slot]
    full_numel: int
    shard_numel: int
    buckets: list[Bucket] = field(default_factory=list)

    def by_name(self) -> dict[str, Slot]:
        return {s.name: s for s in self.slots}


def make_layout(named_shapes: Sequence[tuple[str, Sequence[int]]], world: int, bucket_numel: int) -> Layout:
    """Layout for parameters given in registration order (they are placed in reverse)."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if bucket_numel < 1:
        raise ValueError(f"bucket_numel must be >= 1, got {bucket_numel}")
    slots: list[Slot] = []
    full = shard = 0
    for i, (name, shape) in enumerate(reversed(list(named_shapes))):
        numel = prod(shape) if len(shape) else 1
        chunk = -(-numel // world)
        slots.append(Slot(i, name, tuple(shape), numel, chunk, full, shard))
        full += chunk * world
        shard += chunk
    layout = Layout(world, slots, full, shard)
    layout.buckets = _buckets(slots, world, bucket_numel)
    return layout


def _buckets(slots: list[Slot], world: int, bucket_numel: int) -> list[Bucket]:
    out: list[Bucket] = []
    cur: list[Slot] = []
    size = 0
    for s in slots:
        if cur and size + s.chunk * world > bucket_numel:
            out.append(_bucket(cur, world))
            cur, size = [], 0
        cur.append(s)
        size += s.chunk * world
    if cur:
        out.append(_bucket(cur, world))
    return out


def _bucket(slots: list[Slot], world: int) -> Bucket:
    first, last = slots[0], slots[-1]
    return Bucket(
        slots=tuple(s.index for s in slots),
        full_start=first.full_offset,
        full_end=last.full_offset + last.chunk * world,
        shard_start=first.shard_offset,
        shard_end=last.shard_offset + last.chunk,
    )
