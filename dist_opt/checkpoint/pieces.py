"""A flat piece at an arbitrary global offset, as something DCP saves and loads by offset.

DCP matches saved chunks to requested ones by global element offset. A DTensor ``Shard(0)`` can
only describe the ``torch.chunk`` split (``ceil(numel / world)`` elements per rank), which is the
native engine's layout. FSDP2 splits a parameter by dim-0 *rows* and DeepSpeed ZeRO-1/2 by
fragments of one flat partition per param group: both are contiguous ranges of the flattened
parameter at other offsets. :func:`flat_piece` wraps such a range as a one-shard
``ShardedTensor`` (the type DCP knows for shards at explicit offsets) of global shape
``(numel,)``, so it is written under the same key and shape as the native layout and any layout
(or a full tensor) reads it back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorBase
from torch.distributed._shard.sharding_spec import _infer_sharding_spec_from_shards_metadata

# ShardedTensor's tensor-method dispatch (size(), device) without its deprecation warning: DCP
# calls those methods on every ShardedTensor it saves or loads
_DISPATCH = ShardedTensor.__dict__["__torch_function__"].__func__
_DISPATCH = getattr(_DISPATCH, "__wrapped__", _DISPATCH)


class FlatPiece(ShardedTensor):
    """One rank's contiguous range of a flattened tensor (see :func:`flat_piece`)."""

    _process_group = None  # type: ignore[assignment]  # read by the tensor methods DCP calls; nothing here communicates
    _piece_device: torch.device

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return _DISPATCH(cls, func, types, args, kwargs)

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        """The local piece's device (ShardedTensor's own answer for a rank without shards is CUDA)."""
        return self._piece_device

    def to_local(self) -> Tensor:
        """This rank's elements (an empty tensor when it holds none)."""
        shards = self.local_shards()
        return shards[0].tensor if shards else torch.empty(0, dtype=self._metadata.tensor_properties.dtype)


def flat_piece(local: Tensor, offset: int, numel: int) -> FlatPiece:
    """``local`` (elements ``[offset, offset + local.numel())`` of a flattened tensor of ``numel``
    elements) as a tensor DCP writes at that offset and fills in at that offset on load.

    No communication and no process group needed; a rank holding no elements (``local`` empty)
    writes and reads nothing."""
    n = local.numel()
    mine = ShardMetadata([offset], [n], "rank:0/cpu")
    # the other ranks' ranges only complete the global description; DCP reads and writes just the
    # local shards
    spans = [(0, offset), (offset + n, numel - offset - n)]
    shards_md = ([mine] if n else []) + [ShardMetadata([lo], [k], "rank:0/cpu") for lo, k in spans if k > 0]
    st = ShardedTensorBase.__new__(
        FlatPiece,
        _infer_sharding_spec_from_shards_metadata(shards_md),
        numel,
        dtype=local.dtype,
        layout=torch.strided,
        pin_memory=False,
        requires_grad=False,
    )
    st._local_shards = [Shard(local.reshape(-1), mine)] if n else []
    st._piece_device = local.device
    return st
