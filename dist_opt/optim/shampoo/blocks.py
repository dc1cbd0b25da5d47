"""What Shampoo keeps per block, and how one block's state is saved and loaded.

A saved block is ``{"shape", "root_failures", <factor>, <factor>_condition, [<factor>_root],
[momentum], [graft]}`` keyed by ``"{layer name}/{block index}"``, so checkpoints do not depend on
the world size (the block plan decides which rank owns which block).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dist_opt.optim.shampoo.blocking import Block, LayerBlocking
from dist_opt.optim.shampoo.matrix_root import symmetrize_


def factor_names(order: int) -> tuple[str, ...]:
    """State names of a block's statistics: L (order 1), L/R (order 2), H0..H{k-1} (order k >= 3)."""
    if order == 1:
        return ("L",)
    if order == 2:
        return ("L", "R")
    return tuple(f"H{i}" for i in range(order))


@dataclass(frozen=True)
class BlockInfo:
    """One block of the global plan (every rank knows every block)."""

    key: str  # "{layer name}/{block index}", independent of the world size
    slot: int  # layer (slot) index
    group: int  # position of the layer in the step's groups
    piece: int
    layer: LayerBlocking
    block: Block
    owner: int
    offset: int  # into the owner's send buffer
    phase: int = 0  # root refresh phase within a precondition period (see ``schedule``)

    @property
    def diagonal(self) -> bool:
        return self.layer.diagonal


@dataclass
class BlockState:
    """What the owner of a block keeps."""

    factors: list[Tensor]  # H_i, preconditioner dtype; only the lower triangle is maintained
    roots: list[Tensor | None]  # (H_i + εI)^(-e); None = identity (never refreshed)
    momentum: Tensor | None  # first moment m (param dtype), if β1 > 0
    graft: Tensor | None  # graft second moment A (param dtype), adam/rmsprop/adagrad
    root_failures: int = 0
    condition: list[float] = field(default_factory=list)  # latest estimate per factor (1.0 = identity)
    mm_roots: list[Tensor | None] = field(default_factory=list)  # low-precision root copies (bfloat16 option)

    def tensors(self) -> list[Tensor]:
        """Every tensor this block holds (what ``Shampoo.state_bytes`` counts)."""
        out = list(self.factors) + [r for r in self.roots + self.mm_roots if r is not None]
        return out + [t for t in (self.momentum, self.graft) if t is not None]


def save_block(b: BlockInfo, st: BlockState) -> dict[str, Any]:
    """The saved entry of one block (statistics symmetrised: only their lower triangle is kept up to date)."""
    entry: dict[str, Any] = {"shape": list(b.block.shape), "root_failures": st.root_failures}
    names = factor_names(len(st.factors))
    for n, h, r, c in zip(names, st.factors, st.roots, st.condition, strict=True):
        entry[n] = symmetrize_(h.clone())  # only the lower triangle is kept up to date
        entry[f"{n}_condition"] = c
        if r is not None:
            entry[f"{n}_root"] = r
    if st.momentum is not None:
        entry["momentum"] = st.momentum
    if st.graft is not None:
        entry["graft"] = st.graft
    return entry


def load_block(b: BlockInfo, st: BlockState, entry: dict[str, Any], pdtype: torch.dtype) -> None:
    """Copy a saved entry into ``st`` (checks the block's shape and that every needed tensor is there)."""
    if [int(d) for d in entry.get("shape", [])] != list(b.block.shape):
        raise ValueError(
            f"shampoo state for block {b.key!r} has shape {entry.get('shape')}, expected "
            f"{list(b.block.shape)} (different max_preconditioner_dim?)"
        )
    names = factor_names(len(st.factors))
    for i, n in enumerate(names):
        st.factors[i].copy_(_need(entry, n, b.key))
        root = entry.get(f"{n}_root")
        st.roots[i] = None if root is None else root.to(dtype=pdtype, device=st.factors[i].device).clone()
        st.condition[i] = float(entry.get(f"{n}_condition", 1.0))
    if st.momentum is not None:
        st.momentum.copy_(_need(entry, "momentum", b.key))
    if st.graft is not None:
        st.graft.copy_(_need(entry, "graft", b.key))
    st.root_failures = int(entry.get("root_failures", 0))


def _need(entry: dict[str, Any], name: str, key: str) -> Tensor:
    if name not in entry:
        raise KeyError(f"shampoo state for block {key!r} lacks {name!r} (saved with other betas/grafting?)")
    value: Tensor = entry[name]
    return value
