"""What the training loop needs from a built-in (or user) task.

A task is a deterministic function of (config, seed): the same model init on every rank,
and every sample a pure function of its integer index, so that any split of the global
batch over ranks and micro-steps sees the same data (exactness across world sizes and
resharded resume).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

Batch = Any  # a tuple of tensors whose first dim is the sample dim


class Task(ABC):
    name: str = "task"
    tokens_per_sample: int = 1
    """For tokens/s: 1 for classification/regression, seq_len for language modelling."""
    has_accuracy: bool = True

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model; identical for identical seeds (uses its own torch.Generator)."""

    @property
    @abstractmethod
    def train_size(self) -> int | None:
        """Samples per epoch, or None for an unlimited stream."""

    @abstractmethod
    def train_batch(self, indices: torch.Tensor) -> Batch:
        """Training samples for int64 ``indices`` (a pure function of the indices and the seed)."""

    def train_batches(self, index_batches: Iterable[torch.Tensor]) -> Iterator[Batch]:
        """The training batches for a stream of index tensors, in order: the Trainer pulls one per
        micro-step (this rank's indices of step t, micro-steps k = 0..accumulation-1, then step t+1, ...).
        The default calls :meth:`train_batch` on each; override to load or prefetch differently (the
        batches must stay those of ``train_batch``). The stream is restarted when a resume moves the step."""
        for idx in index_batches:
            yield self.train_batch(idx)

    @property
    @abstractmethod
    def eval_size(self) -> int:
        """Number of held-out samples."""

    @abstractmethod
    def eval_batch(self, indices: torch.Tensor) -> Batch:
        """Held-out samples for ``indices`` in [0, eval_size)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean training loss over the samples of ``batch`` (a scalar with grad)."""

    @abstractmethod
    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """Sums over the batch: ``loss_sum``, ``count`` and, where it applies, ``correct``."""
