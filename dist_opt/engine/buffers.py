"""Model buffers (BatchNorm running statistics, counters) kept identical on every rank.

Each rank's BatchNorm sees only its own micro-batches, so its running statistics drift apart from
the other ranks'. Like DDP's ``broadcast_buffers``, :class:`BufferSync` copies rank 0's buffers to
every rank after each optimizer step (one broadcast per buffer dtype, flattened), so evaluation,
checkpoints and exports agree whichever rank produced them. The alternative,
``model.sync_batchnorm``, converts BatchNorm layers to ``torch.nn.SyncBatchNorm`` (statistics over
the micro-batches of all ranks; one collective per layer and forward; CUDA only).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


class BufferSync:
    """Broadcast a model's buffers from ``src`` to every rank of ``group``."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None, src: int = 0) -> None:
        self.group, self.src = group, src
        by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = defaultdict(list)
        for b in model.buffers():
            by_dtype[(b.dtype, b.device)].append(b)
        self._buckets = list(by_dtype.values())

    @property
    def empty(self) -> bool:
        return not self._buckets

    @torch.no_grad()
    def sync(self) -> None:
        """Make every rank's buffers equal to rank ``src``'s (a collective: every rank calls it)."""
        for bufs in self._buckets:
            # torch defines both helpers without annotations
            flat: Tensor = _flatten_dense_tensors(bufs)  # type: ignore[no-untyped-call]
            dist.broadcast(flat, src=self.src, group=self.group)
            views: list[Tensor] = _unflatten_dense_tensors(flat, bufs)  # type: ignore[no-untyped-call]
            for b, v in zip(bufs, views, strict=True):
                b.copy_(v)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers as ``SyncBatchNorm`` (CUDA only: torch has no CPU kernel for it)."""
    if device.type != "cuda":
        raise ValueError(
            "model.sync_batchnorm: SyncBatchNorm needs CUDA devices (torch has no CPU "
            "implementation); on CPU keep model.broadcast_buffers: true"
        )
    # torch defines this classmethod without annotations
    converted: nn.Module = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]
    return converted
