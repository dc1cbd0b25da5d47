"""Read a checkpoint's model back as one state dict, in one process, without a process group
(the building block of ``dist-opt export``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dist_opt.checkpoint import codec, store
from dist_opt.checkpoint.errors import CheckpointError


def _read(folder: Path, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, Tensor]:
    import warnings

    import torch.distributed.checkpoint as dcp

    from dist_opt.checkpoint.safe_metadata import SafeFileSystemReader

    out = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in shapes.items()}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
        warnings.simplefilter("ignore", UserWarning)
        try:
            dcp.load(out, storage_reader=SafeFileSystemReader(folder), no_dist=True)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - one clear line
            msg = f"cannot read the checkpoint data: {type(e).__name__}: {e}"
            raise CheckpointError([msg], folder) from None
    return out


def read_model_state(folder: str | Path, swa: bool = False) -> dict[str, Tensor]:
    """The model's ``state_dict`` saved in checkpoint ``folder`` (verified first): trained parameters
    and rank 0's buffers. ``swa=True``: the parameters are the SWA/EMA average instead (BatchNorm
    buffers are still the live model's; refresh them before evaluating)."""
    from dist_opt.checkpoint.safe_metadata import load_metadata, tensor_entries

    folder = Path(folder)
    v = store.check(folder, deep=True)
    if not v.ok:
        raise CheckpointError([f"cannot read: {v.problem}"], folder)
    manifest = store.read_manifest(folder)
    md = tensor_entries(load_metadata(folder))
    params = manifest["layout"]["params"]
    want: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name in params:
        e = md[f"model/{name}"]
        want[f"model/{name}"] = (tuple(e.size), e.properties.dtype)
    rank0 = manifest["ranks"][0]
    refs = codec.refs(rank0.get("buffers", {}))
    swa_skel: Any = manifest["shared"].get("ext", {}).get("swa")
    if swa:
        if not swa_skel or not swa_skel.get("n"):
            raise CheckpointError(
                ["the checkpoint holds no SWA average (swa disabled, or no epoch averaged yet)"], folder
            )
        refs += codec.refs(swa_skel)
    for ref in refs:
        e = md[ref[codec.TENSOR]]
        want[ref[codec.TENSOR]] = (tuple(e.size), e.properties.dtype)
    got = _read(folder, want)
    state = {name: got[f"model/{name}"] for name in params}
    if swa:
        averaged = codec.decode(swa_skel, lambda r: got[r[codec.TENSOR]])["averaged"]
        for name, spec in params.items():
            state[name] = averaged[name].reshape(spec["shape"]).clone()
    buffers = codec.decode(rank0.get("buffers", {}), lambda r: got[r[codec.TENSOR]])
    state.update(buffers)
    return state
