"""Sharded, atomic, reshardable checkpoints (torch.distributed.checkpoint) with exact resume.

See :mod:`dist_opt.checkpoint.extension` (when and how), :mod:`.state` (what is saved, under which
keys), :mod:`.store` (folders, marker, validation, keep-last-k) and :mod:`.safe_metadata` (loading
DCP's pickled metadata safely).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dist_opt.checkpoint.consolidate import read_model_state
from dist_opt.checkpoint.errors import CheckpointError
from dist_opt.checkpoint.extension import CheckpointExtension
from dist_opt.checkpoint.resume import resolve_resume
from dist_opt.checkpoint.store import check, checkpoints_dir, find_latest

if TYPE_CHECKING:
    from torch import Tensor
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor


def shard_piece(local: Tensor, numel: int, mesh: DeviceMesh) -> DTensor:
    """This rank's valid piece of a flattened tensor as a DTensor ``Shard(0)`` (saved sharded, resharded
    on load); see :func:`dist_opt.checkpoint.state.shard_piece`."""
    from dist_opt.checkpoint.state import shard_piece as make

    return make(local, numel, mesh)


__all__ = [
    "CheckpointError",
    "CheckpointExtension",
    "check",
    "checkpoints_dir",
    "find_latest",
    "read_model_state",
    "resolve_resume",
    "shard_piece",
]
