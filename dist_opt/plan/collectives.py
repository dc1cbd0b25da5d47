"""α-β cost of the collectives data parallelism uses (pure math).

A message of ``n`` bytes over one link costs ``α + n/β`` (``α`` latency in seconds, ``β`` bandwidth
in bytes/s, one direction). With ``p`` ranks and ``n`` the full tensor's bytes:

- ring all-reduce:      ``2(p-1)α + 2(p-1)/p · n/β``   (reduce-scatter then all-gather around a ring)
- ring reduce-scatter:  ``(p-1)α + (p-1)/p · n/β``      (all-gather: the same)
- tree all-reduce:      ``2⌈log2 p⌉α + 2n/β``           (reduce up then broadcast down a binary tree,
  pipelined in chunks so each direction moves ``n`` once; NCCL's double binary tree)
- tree reduce-scatter:  ``⌈log2 p⌉α + (p-1)/p · n/β``   (recursive halving; all-gather: recursive
  doubling, the same cost; Thakur, Rabenseifner & Gropp 2005)

``auto`` takes the cheaper of the two, as NCCL's tuner does. On several nodes with ``g > 1`` ranks
each, the collectives are hierarchical: inside the node over the intra-node link, across nodes
with ``g`` concurrent rings (one per local rank, each on ``n/g`` bytes) sharing the node's network:

- all-reduce:     intra reduce-scatter(n, g) + inter all-reduce(n/g, N) + intra all-gather(n, g)
- reduce-scatter: intra reduce-scatter(n, g) + inter reduce-scatter(n/g, N)
- all-gather:     inter all-gather(n/g, N) + intra all-gather(n, g)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALGORITHMS = ("ring", "tree", "auto")
OPS = ("all_reduce", "reduce_scatter", "all_gather")


@dataclass(frozen=True)
class Link:
    """One direction of a rank's link: ``latency_s`` (α) and ``bandwidth_Bps`` (β, bytes/s)."""

    latency_s: float
    bandwidth_Bps: float


def _check(op: str, nbytes: float, ranks: int) -> None:
    if op not in OPS:
        raise ValueError(f"op={op!r}: expected one of {OPS}")
    if ranks < 1:
        raise ValueError(f"ranks={ranks}: expected >= 1")
    if nbytes < 0:
        raise ValueError(f"nbytes={nbytes}: expected >= 0")


def ring(op: str, nbytes: float, ranks: int, link: Link) -> float:
    """Seconds of a ring ``op`` ("all_reduce", "reduce_scatter", "all_gather") over ``ranks``."""
    _check(op, nbytes, ranks)
    p = ranks
    if p == 1:
        return 0.0
    steps = 2 * (p - 1) if op == "all_reduce" else p - 1
    return steps * link.latency_s + steps / p * nbytes / link.bandwidth_Bps


def tree(op: str, nbytes: float, ranks: int, link: Link) -> float:
    """Seconds of a tree ``op`` (pipelined binary tree all-reduce; recursive halving/doubling)."""
    _check(op, nbytes, ranks)
    p = ranks
    if p == 1:
        return 0.0
    depth = math.ceil(math.log2(p))
    if op == "all_reduce":
        return 2 * depth * link.latency_s + 2 * nbytes / link.bandwidth_Bps
    return depth * link.latency_s + (p - 1) / p * nbytes / link.bandwidth_Bps


def flat(op: str, nbytes: float, ranks: int, link: Link, algorithm: str = "auto") -> float:
    """One level: ``ring``, ``tree`` or the cheaper of the two (``auto``)."""
    if algorithm == "ring":
        return ring(op, nbytes, ranks, link)
    if algorithm == "tree":
        return tree(op, nbytes, ranks, link)
    if algorithm == "auto":
        return min(ring(op, nbytes, ranks, link), tree(op, nbytes, ranks, link))
    raise ValueError(f"algorithm={algorithm!r}: expected one of {ALGORITHMS}")


def collective(
    op: str,
    nbytes: float,
    nodes: int,
    ranks_per_node: int,
    intra: Link,
    inter: Link,
    algorithm: str = "auto",
) -> float:
    """Seconds of ``op`` on ``nodes × ranks_per_node`` ranks; hierarchical when both exceed 1.

    ``inter`` is the link one rank sees across nodes when all ``ranks_per_node`` local ranks
    communicate at once (the node's network bandwidth divided among them).
    """
    g, n_nodes = ranks_per_node, nodes
    if g < 1 or n_nodes < 1:
        raise ValueError(f"nodes={nodes}, ranks_per_node={ranks_per_node}: expected >= 1")
    if n_nodes == 1:
        return flat(op, nbytes, g, intra, algorithm)
    if g == 1:
        return flat(op, nbytes, n_nodes, inter, algorithm)
    if op == "all_reduce":
        return (
            flat("reduce_scatter", nbytes, g, intra, algorithm)
            + flat("all_reduce", nbytes / g, n_nodes, inter, algorithm)
            + flat("all_gather", nbytes, g, intra, algorithm)
        )
    if op in ("reduce_scatter", "all_gather"):
        return flat(op, nbytes, g, intra, algorithm) + flat(op, nbytes / g, n_nodes, inter, algorithm)
    raise ValueError(f"op={op!r}: expected one of {OPS}")
