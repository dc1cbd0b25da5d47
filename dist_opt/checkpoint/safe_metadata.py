"""Loading DCP's ``.metadata`` without executing anything a checkpoint file says.

``FileSystemReader.read_metadata`` uses plain ``pickle.load``, so a crafted ``.metadata`` could run
code when loaded. :func:`load_metadata` unpickles it with an allow-list of the classes DCP's
metadata is made of (its dataclasses, ``torch.Size``, dtypes, the strided-layout helper and
``pathlib`` paths) -- any other global is refused before it is imported -- and then checks the
structure: tensor entries only (no pickled "bytes" entries, which DCP would ``torch.load`` without
``weights_only``), sane sizes and chunks, and storage entries that point to this folder's own
``__<rank>_<n>.distcp`` files. Tensor data itself is read by DCP with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner

from dist_opt.checkpoint.errors import CheckpointError

METADATA = ".metadata"
MAX_METADATA_BYTES = 512 * 2**20
DATA_FILE = re.compile(r"^__\d+_\d+\.distcp$")
_MD = "torch.distributed.checkpoint.metadata"
ALLOWED_GLOBALS = frozenset(
    {
        (_MD, "Metadata"),
        (_MD, "MetadataIndex"),
        (_MD, "TensorStorageMetadata"),
        (_MD, "ChunkStorageMetadata"),
        (_MD, "TensorProperties"),
        (_MD, "StorageMeta"),
        (_MD, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
    }
)


class _Refused(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"refused global {module}.{name} (not part of DCP checkpoint metadata)")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("refused persistent id")


def load_metadata(folder: str | Path) -> Metadata:
    """The DCP metadata of ``folder``, unpickled with the allow-list and checked (see module doc)."""
    path = Path(folder) / METADATA
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError([f"cannot read {METADATA}: {e.strerror or e}"], folder) from None
    if len(data) > MAX_METADATA_BYTES:
        raise CheckpointError(
            [f"{METADATA} is {len(data)} bytes, larger than any plausible metadata"], folder
        )
    try:
        md = _RestrictedUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise CheckpointError([f"{METADATA} refused: {e}"], folder) from None
    except Exception as e:  # truncated / garbage
        raise CheckpointError([f"{METADATA} is corrupt ({type(e).__name__}: {e})"], folder) from None
    problems = check_metadata(md, Path(folder))
    if problems:
        raise CheckpointError([f"{METADATA}: {p}" for p in problems[:10]], folder)
    return md


def _is_size(x: Any, ndim: int | None = None) -> bool:
    return (
        isinstance(x, torch.Size)
        and all(isinstance(d, int) and d >= 0 for d in x)
        and (ndim is None or len(x) == ndim)
    )


def check_metadata(md: Any, folder: Path) -> list[str]:
    """Structural problems of an unpickled metadata object (empty list: fine)."""
    if not isinstance(md, Metadata):
        return [f"expected DCP Metadata, got {type(md).__name__}"]
    if not isinstance(md.state_dict_metadata, dict):
        return ["state_dict_metadata is not a dict"]
    problems = []
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(key, str):
            problems.append(f"non-string key {key!r}")
        elif not isinstance(entry, TensorStorageMetadata):
            problems.append(
                f"{key}: entry of type {type(entry).__name__} refused (only tensors are "
                "expected; pickled objects are never loaded)"
            )
        elif not _is_size(entry.size) or not isinstance(entry.properties.dtype, torch.dtype):
            problems.append(f"{key}: malformed size or dtype")
        elif not isinstance(entry.chunks, list) or not all(
            isinstance(c, ChunkStorageMetadata)
            and _is_size(c.offsets, len(entry.size))
            and _is_size(c.sizes, len(entry.size))
            and all(o + s <= d for o, s, d in zip(c.offsets, c.sizes, entry.size, strict=True))
            for c in entry.chunks
        ):
            problems.append(f"{key}: malformed chunks")
    if not isinstance(md.storage_data, dict):
        return [*problems, "storage_data is not a dict"]
    for idx, info in md.storage_data.items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(idx, MetadataIndex) or not isinstance(idx.fqn, str):
            problems.append(f"malformed storage index {idx!r}")
        elif not isinstance(rel, str) or not DATA_FILE.match(rel):
            problems.append(f"{idx.fqn}: storage file {rel!r} is not a data file of this folder")
        elif not (
            isinstance(info.offset, int)
            and isinstance(info.length, int)
            and info.offset >= 0
            and info.length >= 0
        ):
            problems.append(f"{idx.fqn}: malformed storage offset/length")
        elif getattr(info, "transform_descriptors", None):
            problems.append(f"{idx.fqn}: storage transforms {info.transform_descriptors!r} are not supported")
    if md.storage_meta is not None and not isinstance(md.storage_meta, StorageMeta):
        problems.append("malformed storage_meta")
    return problems


def tensor_entries(md: Metadata) -> dict[str, TensorStorageMetadata]:
    """The entries of checked metadata, all tensors (:func:`load_metadata` refuses any other kind)."""
    out: dict[str, TensorStorageMetadata] = {}
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError([f"{METADATA}: {key}: entry of type {type(entry).__name__} refused"])
        out[key] = entry
    return out


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata comes from :func:`load_metadata` and which never loads
    pickled ("bytes") items."""

    def __init__(self, path: str | Path):
        super().__init__(str(path))
        self._folder = Path(path)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md = load_metadata(self._folder)
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Any:
        if any(item.type == LoadItemType.BYTE_IO for item in plan.items):
            raise CheckpointError(["a pickled (bytes) item was requested; refused"], self._folder)
        return super().read_data(plan, planner)
