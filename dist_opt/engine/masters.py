"""fp32 master copies of this rank's low-precision parameter pieces (mixed precision).

With bf16/fp16 working parameters the update rule must not run on the working copy: an update
smaller than half a unit in the last place of bf16 (8 bits of mantissa) rounds away, so e.g. SGD at
lr 1e-3 never moves a weight of 1.0. As DeepSpeed's ZeRO does, the engine keeps a *master* copy in
``master_dtype`` (fp32) of THIS RANK'S pieces only (1/N of every parameter at ZeRO-1/2, whole
parameters at ZeRO-0); the rule and all optimizer state run on the masters with gradients upcast
to the master dtype, and after the update the masters are rounded into the working pieces, which
the parameter all-gather then moves in the working dtype (half the bytes of fp32).

Pieces whose working dtype already is the master dtype (fp32 layers of a mixed model) have no copy:
their master is the working piece itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Masters", "as_dtypes"]


class Masters:
    """Master pieces for ``working`` (this rank's 1-D pieces, padded to their chunk sizes)."""

    def __init__(self, working: Sequence[Tensor], master_dtype: torch.dtype) -> None:
        self.dtype = master_dtype
        # only narrower working dtypes (bf16/fp16 under fp32) get a master; fp32/fp64 are their own
        bits = torch.finfo(master_dtype).bits
        self.low = [i for i, w in enumerate(working) if torch.finfo(w.dtype).bits < bits]
        device = working[0].device if working else torch.device("cpu")
        self.buf = torch.empty(sum(working[i].numel() for i in self.low), dtype=master_dtype, device=device)
        self.pieces: list[Tensor] = list(working)
        start = 0
        for i in self.low:
            n = working[i].numel()
            self.pieces[i] = self.buf[start : start + n]
            start += n
        self._working = list(working)
        self.refresh()

    @property
    def active(self) -> bool:
        """Whether any piece has a separate master copy."""
        return bool(self.low)

    @torch.no_grad()
    def refresh(self) -> None:
        """Masters := working pieces (after the working parameters were set from elsewhere)."""
        if self.low:
            torch._foreach_copy_([self.pieces[i] for i in self.low], [self._working[i] for i in self.low])

    @torch.no_grad()
    def write_back(self) -> None:
        """Working pieces := masters rounded to the working dtype (after an update)."""
        if self.low:
            torch._foreach_copy_([self._working[i] for i in self.low], [self.pieces[i] for i in self.low])

    def state(self) -> list[Tensor | None]:
        """Per layer: the separate master piece, or None where the working piece is the master."""
        low = set(self.low)
        return [p if i in low else None for i, p in enumerate(self.pieces)]

    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()


def as_dtypes(grads: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """``grads`` converted to the dtypes of ``like`` (the same tensors where they already match)."""
    return [g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, like, strict=True)]
