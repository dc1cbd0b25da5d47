"""How a parameter is cut into Shampoo blocks (pure shape arithmetic, no state).

1. Dimensions of size 1 are dropped and adjacent dimensions are merged greedily from the left
   while their product stays <= ``max_dim`` (a (10, 64) matrix with max_dim 1024 becomes one
   640-vector; (64, 3, 3, 3) becomes (576, 3)).
2. Every merged dimension larger than ``max_dim`` is split into chunks of ``max_dim`` (the last
   one holds the remainder), and the blocks are the cells of the resulting grid, numbered in
   row-major (C) order.

A block of order k gets one k-th mode statistic per dimension. Parameters that are 1-D (biases,
norm weights) or have no dimension > 1 are *diagonal*: one block covering the whole tensor that
uses the graft method only. The blocking depends only on (shape, max_dim), never on the world
size, so block names ``"{layer}/{index}"`` are stable across resharding.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Block:
    """One cell of a layer's block grid."""

    index: int  # position in the layer's row-major block order
    slices: tuple[slice, ...]  # into the merged view of the parameter
    shape: tuple[int, ...]  # size of the cell (each dim <= max_dim); (numel,) for a diagonal block

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class LayerBlocking:
    shape: tuple[int, ...]  # the parameter's own shape
    merged: tuple[int, ...]  # the shape it is viewed as; (numel,) for a diagonal layer
    diagonal: bool  # graft-only (1-D parameter or no dimension > 1)
    blocks: tuple[Block, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def merge_dims(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """Drop size-1 dims, then merge adjacent dims from the left while the product is <= max_dim."""
    dims = [d for d in shape if d != 1]
    if not dims:
        return ()
    out = [dims[0]]
    for d in dims[1:]:
        if out[-1] * d <= max_dim:
            out[-1] *= d
        else:
            out.append(d)
    return tuple(out)


def split_dim(size: int, max_dim: int) -> list[tuple[int, int]]:
    """(start, length) chunks of at most max_dim covering [0, size)."""
    return [(s, min(max_dim, size - s)) for s in range(0, size, max_dim)]


def block_layer(shape: tuple[int, ...], max_dim: int) -> LayerBlocking:
    """The block grid of a parameter of ``shape`` (see the module docstring)."""
    if max_dim < 1:
        raise ValueError(f"max_preconditioner_dim must be >= 1, got {max_dim}")
    shape = tuple(int(d) for d in shape)
    numel = math.prod(shape)
    merged = merge_dims(shape, max_dim)
    if len(shape) <= 1 or not merged:
        whole = Block(0, (slice(0, numel),), (numel,))
        return LayerBlocking(shape, (numel,), True, (whole,))
    chunks = [split_dim(d, max_dim) for d in merged]
    blocks = []
    for i, cell in enumerate(itertools.product(*chunks)):
        blocks.append(Block(i, tuple(slice(s, s + n) for s, n in cell), tuple(n for _, n in cell)))
    return LayerBlocking(shape, merged, False, tuple(blocks))


def block_view(flat: Tensor, layer: LayerBlocking, block: Block) -> Tensor:
    """The (possibly strided) view of ``block`` inside a layer's flat 1-D tensor."""
    return flat.view(layer.merged)[block.slices]


def split_blocks(flat: Tensor, layer: LayerBlocking) -> list[Tensor]:
    """Contiguous copies of all blocks of a layer's flat tensor, in block order."""
    return [block_view(flat, layer, b).contiguous() for b in layer.blocks]


def merge_blocks(blocks: list[Tensor], layer: LayerBlocking, out: Tensor) -> Tensor:
    """Write ``blocks`` (in block order) back into the flat tensor ``out``; inverse of split_blocks."""
    for b, t in zip(layer.blocks, blocks, strict=True):
        block_view(out, layer, b).copy_(t.reshape(b.shape))
    return out
