"""Which checkpoint ``resume`` (none | latest | PATH) means, decided before anything is loaded or written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_opt.checkpoint import store
from dist_opt.checkpoint.errors import CheckpointError
from dist_opt.config import Config, ConfigError


def resolve_resume(cfg: Config, root: Path, report: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint folder ``cfg.resume`` asks for (None: start fresh). Raises ConfigError for a path
    that does not exist, CheckpointError for one that is not a usable checkpoint, and refuses to start
    a fresh run whose checkpoints would overwrite complete ones already in ``run.out_dir``."""
    resume = cfg.resume.strip()
    if resume.lower() == "none":
        existing = store.complete_steps(root)
        c = cfg.checkpoint
        if existing and (c.every_steps or c.every_epochs or c.at_end):
            raise ConfigError(
                [
                    f"resume: none, but {root} already holds checkpoints (newest: "
                    f"step-{existing[-1][0]}); set resume=latest to continue that run, or choose "
                    "another run.out_dir"
                ]
            )
        return None
    if resume.lower() == "latest":
        found = store.find_latest(root, report=report)
        if found is None and report is not None:
            report(f"resume=latest: no complete checkpoint in {root}; starting from step 0")
        return found
    path = Path(resume).expanduser()
    if not path.exists():
        raise ConfigError(
            [f"resume: {resume!r} does not exist (expected none, latest, or a checkpoint folder)"]
        )
    if store.STEP_DIR.match(path.name) or (path / store.MARKER).exists() or (path / ".metadata").exists():
        v = store.check(path, deep=True)
        if not v.ok:
            raise CheckpointError([f"cannot resume: {v.problem}"], path)
        return path
    sub = store.checkpoints_dir(path)
    found = store.find_latest(sub if sub.is_dir() else path, report=report)
    if found is None:
        raise CheckpointError(["cannot resume: no complete checkpoint in this folder"], path)
    return found


def resolve_agreed(
    cfg: Config, root: Path, rank: int, group: Any, report: Callable[[str], None] | None = None
) -> Path | None:
    """Rank 0 decides what to resume from (:func:`resolve_resume`) and tells every rank (collective);
    its refusal is raised on every rank."""
    import torch.distributed as dist

    result: list[Any] = [None]
    if rank == 0:
        try:
            result[0] = ("ok", resolve_resume(cfg, root, report=report), None)
        except CheckpointError as e:
            result[0] = ("checkpoint", e.problems, e.source)
        except ConfigError as e:
            result[0] = ("config", e.problems, e.source)
        except Exception as e:  # noqa: BLE001 - the other ranks must not wait for an answer forever
            result[0] = ("checkpoint", [f"cannot resume ({type(e).__name__}: {e})"], cfg.resume)
    dist.broadcast_object_list(result, src=0, group=group)
    kind, value, source = result[0]
    if kind == "checkpoint":
        raise CheckpointError(value, source)
    if kind == "config":
        raise ConfigError(value, source)
    return None if value is None else Path(value)
