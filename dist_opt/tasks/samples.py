"""Reading samples of a map-style dataset into batches, with one-line errors naming the sample.

:class:`SampleReader` reads ``dataset[i]`` for a list of indices and collates them. Used directly
(``read``) it raises :class:`SampleError`; as the dataset of a ``torch.utils.data.DataLoader``
(``__getitems__``) it returns a :class:`ReadFailure` instead, so the one-line message survives the
trip back from a worker process (torch would wrap an exception raised there in a multi-line
traceback); :func:`unwrap` turns it back into the error in the training process.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

Collate = Callable[[list[Any]], Any]


class SampleError(ValueError):
    """A sample (named by its index) that cannot be read or batched; the message is one line."""


@dataclass(frozen=True)
class ReadFailure:
    """A :class:`SampleError` message, passed back from a DataLoader worker as a value."""

    message: str


def _kind(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"Tensor of shape {tuple(obj.shape)} and dtype {obj.dtype}"
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):  # numpy arrays
        return f"{type(obj).__name__} of shape {tuple(obj.shape)} and dtype {obj.dtype}"
    t = type(obj)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _batchable(obj: Any) -> bool:
    """True if torch's default collate can batch ``obj`` (tensors, numbers, numpy, strings, containers)."""
    if isinstance(obj, torch.Tensor | numbers.Number | str | bytes):
        return True
    if type(obj).__module__ == "numpy":
        return type(obj).__name__ != "object_"
    if isinstance(obj, Mapping):
        return all(_batchable(v) for v in obj.values())
    if isinstance(obj, Sequence):
        return all(_batchable(v) for v in obj)
    return False


def check_dataset(data: Any, what: str) -> int:
    """``len(data)`` of a non-empty map-style dataset; TypeError/ValueError (one line) otherwise."""
    if isinstance(data, IterableDataset):
        raise TypeError(
            f"DatasetTask: {what} data is an IterableDataset, but training reads samples by index (the global-batch "
            "sampler picks them, so a run resumes exactly at any world size); wrap it as a map-style Dataset "
            "with __len__ and __getitem__(index)"
        )
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise TypeError(
            f"DatasetTask: {what} data ({_kind(data)}) needs __len__ and __getitem__(index) "
            "(a map-style torch.utils.data.Dataset)"
        )
    n = len(data)
    if n == 0:
        raise ValueError(f"DatasetTask: {what} data is empty")
    return n


def check_sample(sample: Any, index: int, what: str, like: Any = None) -> None:
    """One cheap look at a sample meant for the default collate: a tuple (inputs..., target) of
    batchable elements, with as many elements as ``like`` (another split's sample) if given."""
    if not isinstance(sample, tuple | list) or len(sample) < 2:
        raise SampleError(
            f"{what} sample {index}: expected an (input, target) tuple, got a {_kind(sample)} "
            "(return (input, target) from __getitem__, or pass collate_fn to build batches yourself)"
        )
    for k, element in enumerate(sample):
        if not _batchable(element):
            raise SampleError(
                f"{what} sample {index}: element {k} is a {_kind(element)}, which cannot be batched "
                "(return tensors, numbers or numpy arrays, or pass collate_fn)"
            )
    if like is not None and len(like) != len(sample):
        raise SampleError(
            f"{what} sample {index} has {len(sample)} elements but train sample 0 has {len(like)}"
        )


def _difference(a: Any, b: Any) -> str | None:
    """Why samples ``a`` and ``b`` cannot be stacked together (the first difference), or None."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return f"shape {tuple(b.shape)} differs from {tuple(a.shape)}"
        return None if a.dtype == b.dtype else f"dtype {b.dtype} differs from {a.dtype}"
    if hasattr(a, "shape") and hasattr(b, "shape") and tuple(a.shape) != tuple(b.shape):
        return f"shape {tuple(b.shape)} differs from {tuple(a.shape)}"
    if type(a) is not type(b) and not (isinstance(a, numbers.Number) and isinstance(b, numbers.Number)):
        return f"a {_kind(b)} where the other sample has a {_kind(a)}"
    if isinstance(a, Sequence) and not isinstance(a, str | bytes):
        if len(a) != len(b):
            return f"{len(b)} elements where the other sample has {len(a)}"
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            why = _difference(x, y)
            if why is not None:
                return f"element {k}: {why}"
    return None


def collate_problem(samples: list[Any], indices: Sequence[int], what: str, error: BaseException) -> str:
    """One line naming the first sample that does not fit with the first one of the batch."""
    for i, sample in zip(indices[1:], samples[1:], strict=True):
        why = _difference(samples[0], sample)
        if why is not None:
            return (
                f"{what} sample {i}: {why} (in {what} sample {indices[0]}); the samples of a batch must "
                "match: pass collate_fn to pad or otherwise combine them"
            )
    shown = ", ".join(map(str, indices[:8])) + (", ..." if len(indices) > 8 else "")
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return f"{what} samples [{shown}]: cannot be batched: {lines[0]}"


class SampleReader(Dataset):
    """``data`` with ``collate`` applied to each batch of indices (see the module docstring)."""

    def __init__(self, data: Any, collate: Collate, what: str) -> None:
        self.data, self.collate, self.what = data, collate, what

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        return self.data[index]

    def read(self, indices: Sequence[int]) -> Any:
        """The collated batch of ``data[i]`` for ``indices`` (a list becomes a tuple); SampleError if
        the samples cannot be batched. An error raised by the dataset itself keeps its traceback and
        gets a note naming the sample."""
        samples = []
        for i in indices:
            try:
                samples.append(self.data[i])
            except Exception as e:
                if hasattr(e, "add_note"):
                    e.add_note(f"(while reading {self.what} sample {i})")
                raise
        try:
            batch = self.collate(samples)
        except Exception as e:
            raise SampleError(collate_problem(samples, list(indices), self.what, e)) from e
        return tuple(batch) if type(batch) is list else batch

    def __getitems__(self, indices: list[int]) -> Any:
        try:
            return self.read(indices)
        except SampleError as e:
            return ReadFailure(str(e))


def unwrap(batch: Any) -> Any:
    """``batch``, or the :class:`SampleError` a worker reported instead of it."""
    if isinstance(batch, ReadFailure):
        raise SampleError(batch.message)
    return batch


def passthrough(batch: Any) -> Any:
    """The DataLoader's collate_fn: :meth:`SampleReader.__getitems__` has already collated."""
    return batch
