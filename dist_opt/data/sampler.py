"""Deterministic global-batch sampler, independent of world size and accumulation.

Global step s (0-based) always consumes the same global batch: for a finite dataset of N
samples, epoch e = s // steps_per_epoch uses permutation perm_e (seeded by (seed, e)) and
position s % steps_per_epoch; the last partial batch of an epoch is dropped. For an unlimited
stream, step s consumes sample ids [s·B, (s+1)·B). The batch is split among ranks and
micro-steps by position: micro-step k of rank r takes rows [(k·W + r)·m, (k·W + r + 1)·m).
The only state is the step counter, so a resumed run — at any world size — continues the
same data stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GlobalBatchSampler:
    size: int | None  # samples per epoch, None = unlimited
    global_batch: int
    seed: int

    def __post_init__(self) -> None:
        if self.size is not None and self.size < self.global_batch:
            raise ValueError(
                f"data.global_batch={self.global_batch} exceeds the training set size {self.size}"
            )
        self._perm_epoch: int | None = None
        self._perm: torch.Tensor | None = None

    @property
    def steps_per_epoch(self) -> int | None:
        return None if self.size is None else self.size // self.global_batch

    def epoch_of(self, step: int) -> int:
        spe = self.steps_per_epoch
        return 0 if spe is None else step // spe

    def is_epoch_end(self, step: int) -> bool:
        """True if 0-based ``step`` is the last step of an epoch."""
        spe = self.steps_per_epoch
        return spe is not None and (step + 1) % spe == 0

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm_epoch != epoch:
            assert self.size is not None  # only a finite dataset is permuted
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
            self._perm = torch.randperm(self.size, generator=g)
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, step: int) -> torch.Tensor:
        b = self.global_batch
        spe = self.steps_per_epoch
        if spe is None:  # an unlimited stream
            return torch.arange(step * b, (step + 1) * b, dtype=torch.long)
        pos = step % spe
        return self._permutation(step // spe)[pos * b : (pos + 1) * b]

    @staticmethod
    def split(indices: torch.Tensor, rank: int, world: int, micro: int, k: int) -> torch.Tensor:
        lo = (k * world + rank) * micro
        return indices[lo : lo + micro]

    def state_dict(self) -> dict:
        return {"size": self.size, "global_batch": self.global_batch, "seed": self.seed}
