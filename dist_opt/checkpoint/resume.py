"""Which checkpoint ``resume`` means, decided before anything is loaded or written.

* ``none``: start fresh (refused when the run would save over complete checkpoints already there);
* ``latest``: the newest usable checkpoint of ``run.out_dir``; with none at all, start fresh; when
  every checkpoint folder there is unusable and at least one is corrupt (it has its completion
  marker but fails the checks), refuse: starting over would overwrite that evidence;
* ``latest_or_new``: as ``latest``, but start fresh even then;
* ``auto``: as ``latest`` (the mode for a config that is simply run again: it continues its run);
* a path: that step folder, or the newest usable checkpoint of that run or checkpoints folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_opt.checkpoint import store
from dist_opt.checkpoint.errors import CheckpointError
from dist_opt.config import Config, ConfigError

LATEST_MODES = ("latest", "latest_or_new", "auto")


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
                    f"step-{existing[-1][0]}); set resume=latest (or auto) to continue that run, or choose "
                    "another run.out_dir"
                ]
            )
        return None
    mode = resume.lower()
    if mode in LATEST_MODES:
        return _latest(root, mode, report)
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


def _latest(root: Path, mode: str, report: Callable[[str], None] | None) -> Path | None:
    corrupt: list[str] = []
    skipped: list[str] = []  # said unless the refusal below says it all in one line
    say = report if report is not None else (lambda msg: None)
    for _, folder in reversed(store.list_step_dirs(root)):
        v = store.check(folder, deep=True)
        if v.ok:
            for line in skipped:
                say(line)
            return folder
        skipped.append(f"checkpoint {folder} skipped: {v.problem}")
        if (folder / store.MARKER).exists():  # completed once, damaged since (not a killed save)
            corrupt.append(f"{folder.name} ({v.problem})")
    if corrupt and mode != "latest_or_new":
        raise CheckpointError(
            [
                f"resume={mode}: no usable checkpoint, and {len(corrupt)} corrupt one(s): "
                f"{'; '.join(corrupt)}; refusing to start over in this run.out_dir (it would overwrite "
                "them and metrics.jsonl): move them away, choose another run.out_dir, or set "
                "resume=latest_or_new to start from step 0 anyway"
            ],
            root,
        )
    for line in skipped:
        say(line)
    if mode != "auto" or skipped:
        say(f"resume={mode}: no complete checkpoint in {root}; starting from step 0")
    return None


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
