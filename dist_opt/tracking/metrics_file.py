"""``metrics.jsonl``: one JSON object per line, written by rank 0, W&B or not.

Line kinds:

- metric lines ``{"step": <int>, "<name>": <value>, ...}`` (train lines carry ``loss``, ``lr``...;
  eval lines ``eval/...`` keys, logged with the same step as the train line);
- event lines ``{"event": "summary", ...}`` (the run summary, written by :meth:`Tracker.summary`).

Values are JSON numbers, strings, booleans or null. Non-finite floats are written as the strings
``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (the file stays strict JSON) and :func:`read_metrics`
turns them back into floats.

Resume policy: a resumed run (``resume_step`` given) keeps the metric lines with
``step <= resume_step`` and drops later ones (they are recomputed after the restart) and the
previous summary line; a fresh run (``resume_step`` is None) starts an empty file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

_NONFINITE_OUT = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_NONFINITE_IN = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

Scalar = float | int | bool | str | None


def to_scalar(key: str, value: Any) -> Scalar:
    """A metric value as a plain Python scalar (tensors/numpy scalars via ``.item()``)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            out = item()
        except (ValueError, RuntimeError) as e:  # e.g. a tensor with more than one element
            raise TypeError(f"metric {key!r}: not a scalar ({e})") from None
        if isinstance(out, bool | int | float):
            return out
    raise TypeError(f"metric {key!r}: expected a number or string, got {type(value).__name__}")


def _encode(value: Scalar) -> Scalar:
    if isinstance(value, float) and not math.isfinite(value):
        return _NONFINITE_OUT[repr(value)]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value in _NONFINITE_IN:
        return _NONFINITE_IN[value]
    return value


def encode_line(row: Mapping[str, Any]) -> str:
    """One strict-JSON line (no trailing newline)."""
    return json.dumps({k: _encode(v) for k, v in row.items()}, allow_nan=False, separators=(",", ":"))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All lines of a ``metrics.jsonl`` (metric and event lines) as dicts, non-finite values as floats.

    A truncated last line (a run killed mid-write) is ignored; any other bad line raises
    ``ValueError`` naming the file and line number.
    """
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows: list[dict] = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last and not text.endswith("\n"):
                break
            raise ValueError(f"{p}:{i + 1}: not a JSON line ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{p}:{i + 1}: expected a JSON object, got {type(obj).__name__}")
        rows.append({k: _decode(v) for k, v in obj.items()})
    return rows


def _last_step(rows: list[dict]) -> int | None:
    steps = [r["step"] for r in rows if isinstance(r.get("step"), int) and "event" not in r]
    return max(steps) if steps else None


class MetricsFile:
    """Append-only writer of ``metrics.jsonl`` (every line flushed, so a killed run keeps its lines)."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.previous_last_step: int | None = None
        """Largest step in the file before a resume truncated it (None: fresh run or no lines)."""
        self.kept: list[dict] = []
        """The lines a resume kept (``step <= resume_step``), in file order."""
        if resume_step is None:
            self._fh: IO[str] | None = open(self.path, "w", encoding="utf-8")
            return
        if self.path.exists():
            rows = read_metrics(self.path)
            self.previous_last_step = _last_step(rows)
            self.kept = keep = [
                r
                for r in rows
                if "event" not in r and isinstance(r.get("step"), int) and r["step"] <= resume_step
            ]
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.writelines(encode_line(r) + "\n" for r in keep)
            os.replace(tmp, self.path)
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one line and flush it."""
        if self._fh is None:
            raise ValueError(f"{self.path}: metrics file is closed")
        self._fh.write(encode_line(row) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
