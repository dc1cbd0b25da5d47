"""The one error type of the checkpoint package."""

from __future__ import annotations

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
    return f"{type(e).__name__}: {text[0] if text else ''}"
