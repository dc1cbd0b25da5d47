"""The one error type of the checkpoint package."""

from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dist_opt.config.loader import ConfigError


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (missing, incomplete, corrupt, unsafe, or from another model or
    optimizer). A :class:`ConfigError` so that ``dist-opt train`` reports it in one line per problem
    and exits with code 2 (bad input) before writing anything."""

    def __init__(self, problems: Sequence[str], path: str | Path | None = None):
        self.problems = list(problems)
        self.source = None if path is None else str(path)
        where = f"{path}: " if path is not None else ""
        Exception.__init__(self, "\n".join(f"checkpoint error: {where}{p}" for p in self.problems))


def agree(problems: list[str], folder: str | Path, group: Any, world: int) -> None:
    """Raise the same CheckpointError on every rank if any rank has problems (a collective: every rank
    of ``group`` calls it, so all refuse or none does)."""
    import torch.distributed as dist

    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, problems, group=group)
    merged: list[str] = []
    for r, mine in enumerate(everyone):
        for line in mine:
            line = line if r == 0 or line in everyone[0] else f"(rank {r}) {line}"
            if line not in merged:
                merged.append(line)
    if merged:
        raise CheckpointError(merged, folder)


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` of an exception (DCP wraps long per-rank reports)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {scrub(text[0]) if text else ''}"


_UNSAFE_ADVICE = re.compile(r"weights[_ ]only|trust the source|arbitrary code", re.I)


def scrub(text: str) -> str:
    """``text`` without torch.load's advice to load with ``weights_only=False`` (which would run whatever
    code a crafted file holds): every sentence that mentions it is dropped."""
    parts = re.split(r"(?<=[.!?:])\s+", " ".join(text.split()))
    return " ".join(p for p in parts if not _UNSAFE_ADVICE.search(p)).strip()


def load_failures() -> tuple[type[BaseException], ...]:
    """What a failed DCP load raises: any Exception, and DCP's CheckpointException (a BaseException)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def data_problem(e: BaseException) -> str:
    """The refusal line for checkpoint data that DCP could not load (every rank's failures, scrubbed)."""
    inner: list[BaseException] = [e]
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        inner = [f[0] if isinstance(f, tuple) else f for f in failures.values()] or inner
    unsafe = any(isinstance(x, pickle.UnpicklingError) or "Unpickler" in str(x) for x in inner)
    texts = []
    for x in inner:
        lines = [ln.strip() for ln in str(x).splitlines() if ln.strip()]
        pick = next((ln for ln in lines if "Unpickler error" in ln), lines[0] if lines else "")
        text = f"{type(x).__name__}: {scrub(pick)}"
        if text not in texts:
            texts.append(text)
    if unsafe:
        return (
            "refused as unsafe or corrupt: a tensor data file holds something other than plain tensors "
            f"({'; '.join(texts)}); do not load it, resume from another checkpoint"
        )
    return f"cannot read the checkpoint data: {'; '.join(texts)}"
