"""The one error type of the checkpoint package."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
