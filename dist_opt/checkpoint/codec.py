"""Nested state (dicts, lists, tuples, scalars, tensors) <-> a JSON skeleton plus a flat tensor map.

DCP stores only tensors here (its pickled "bytes" entries would be unpickled without
``weights_only``); everything else goes into the checkpoint's JSON manifest. A tensor becomes
``{"$tensor": key}`` in the skeleton and ``tensors[key]`` in the flat map; tuples and dicts whose
keys are not plain strings are tagged so they come back with their type::

    {"a": (1, 2.5), 3: None, "w": tensor}  ->  {"$dict": [["a", {"$tuple": [1, 2.5]}], [3, None],
                                                          ["w", {"$tensor": "p/w"}]]}, {"p/w": tensor}

Floats round-trip exactly (JSON numbers are written with ``repr``; inf and nan as Infinity/NaN).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

TENSOR, TUPLE, DICT = "$tensor", "$tuple", "$dict"
Json = Any


def _is_tensor(x: Any) -> bool:
    return isinstance(x, Tensor)


def encode(obj: Any, prefix: str, put: Callable[[str, Tensor], dict[str, Any]]) -> Json:
    """Skeleton of ``obj``; every tensor is handed to ``put(key, tensor)`` (key = ``prefix/path``),
    which returns the JSON reference to store in its place."""

    def enc(x: Any, path: str) -> Json:
        if _is_tensor(x):
            return put(path, x)
        if x is None or isinstance(x, bool | str):
            return x
        if isinstance(x, int):
            return int(x)
        if isinstance(x, float):
            return float(x)
        if isinstance(x, tuple):
            return {TUPLE: [enc(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            seen: set[str] = set()
            parts = []
            for k, v in x.items():
                if not (k is None or isinstance(k, bool | int | float | str | tuple)):
                    raise TypeError(
                        f"checkpoint state {path}: dict key {k!r} of type {type(k).__name__} cannot be stored"
                    )
                ks = str(k)
                if ks in seen:
                    raise TypeError(f"checkpoint state {path}: keys {ks!r} collide once written as text")
                seen.add(ks)
                parts.append((k, enc(v, f"{path}/{ks}")))
            if all(isinstance(k, str) and not k.startswith("$") for k, _ in parts):
                return dict(parts)
            return {DICT: [[enc(k, path), v] for k, v in parts]}
        raise TypeError(
            f"checkpoint state {path}: values of type {type(x).__name__} cannot be stored "
            "(use tensors, numbers, strings, None, lists, tuples and dicts)"
        )

    return enc(obj, prefix)


def decode(skel: Json, get: Callable[[dict[str, Any]], Tensor]) -> Any:
    """Inverse of :func:`encode`; ``get(ref)`` returns the tensor of a ``{"$tensor": key}`` reference."""
    if isinstance(skel, list):
        return [decode(v, get) for v in skel]
    if isinstance(skel, dict):
        if TENSOR in skel:
            return get(skel)
        if TUPLE in skel:
            return tuple(decode(v, get) for v in skel[TUPLE])
        if DICT in skel:
            return {_key(decode(k, get)): decode(v, get) for k, v in skel[DICT]}
        return {k: decode(v, get) for k, v in skel.items()}
    return skel


def _key(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


def refs(skel: Json) -> list[dict[str, Any]]:
    """Every ``{"$tensor": ...}`` reference in a skeleton, in order."""
    out: list[dict[str, Any]] = []

    def walk(x: Json) -> None:
        if isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            if TENSOR in x:
                out.append(x)
                return
            for v in x.values():
                walk(v)

    walk(skel)
    return out


def dumps(obj: Json) -> str:
    """JSON text of a skeleton (floats exact; inf/nan allowed)."""
    return json.dumps(obj, indent=1, sort_keys=False, allow_nan=True)


def checksum(t: Tensor) -> int:
    """A cheap content checksum (crc32 of the bytes) used to verify that replicated state is replicated."""
    import zlib

    flat = t.detach().reshape(-1).contiguous().cpu()
    if flat.numel() == 0:
        return 0
    return zlib.crc32(flat.view(torch.uint8).numpy().data)
