"""``dist-opt export``: a run's checkpoint as one plain model ``state_dict`` file.

The file is ``torch.save`` of ``{fqn: tensor}`` (the trained parameters at their full logical shapes
and rank 0's buffers), loadable with ``torch.load(path, weights_only=True)`` and then
``model.load_state_dict``. It is read in this one process without a process group, through the
safe metadata reader, from a checkpoint of any engine (native, deepspeed, fsdp2) and any world
size: every engine saves the parameters under the same keys and shapes. ``swa=True`` exports the
SWA/EMA average instead of the live weights.

Bad input raises :class:`ExportError` (one line) before anything is written; the output is written
to a temporary file next to it and renamed, so it is never left half written.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from dist_opt.checkpoint import store
from dist_opt.checkpoint.consolidate import read_model_state
from dist_opt.checkpoint.errors import CheckpointError


class ExportError(Exception):
    """Bad input to :func:`export` (one readable line)."""


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint folder to export: ``run_dir``'s newest complete checkpoint, or that of ``step``.
    ``run_dir`` may also be a run's ``checkpoints`` folder or one ``step-N`` folder."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ExportError(f"{run_dir}: no such run directory")
    if store.STEP_DIR.match(run.name) and (run / store.MARKER).exists():
        folder = run
    else:
        root = store.checkpoints_dir(run) if store.checkpoints_dir(run).is_dir() else run
        steps = store.list_step_dirs(root)
        if step is None:
            latest = store.find_latest(root)
            if latest is None:
                what = "no checkpoint" if not steps else "no complete checkpoint"
                raise ExportError(f"{run_dir}: {what} in {root}")
            folder = latest
        else:
            found = dict(steps).get(step)
            if found is None:
                have = ", ".join(str(s) for s, _ in steps) or "none"
                raise ExportError(f"{run_dir}: no checkpoint of step {step} (steps there: {have})")
            folder = found
    v = store.check(folder, deep=True)
    if not v.ok:
        raise ExportError(f"{folder}: not a usable checkpoint: {v.problem}")
    if step is not None and v.step is not None and v.step != step:
        raise ExportError(f"{folder} is the checkpoint of step {v.step}, not {step}")
    return folder


def _check_out(out: Path, force: bool) -> None:
    if out.is_dir():
        raise ExportError(f"--out {out}: is a directory; give a file name")
    if out.exists() and not force:
        raise ExportError(f"--out {out}: exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: folder {out.parent} does not exist")


def write_atomic(state: dict[str, Tensor], out: Path) -> None:
    """``torch.save(state)`` to a temporary file beside ``out``, synced, then renamed over ``out``."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def export(
    run_dir: str | Path, out: str | Path, *, step: int | None = None, swa: bool = False, force: bool = False
) -> tuple[Path, int, int]:
    """Write the model of ``run_dir``'s checkpoint (newest complete, or ``step``) to ``out``.

    Returns (checkpoint folder, its step, number of tensors written). Raises :class:`ExportError`
    for bad input (nothing is written then)."""
    out = Path(out)
    _check_out(out, force)
    folder = find_checkpoint(run_dir, step)
    try:
        state = read_model_state(folder, swa=swa)
    except CheckpointError as e:
        raise ExportError("; ".join(f"{folder}: {p}" for p in e.problems)) from None
    state = {k: v.contiguous() for k, v in state.items()}
    write_atomic(state, out)
    m = store.STEP_DIR.match(folder.name)
    return folder, int(m.group(1)) if m else -1, len(state)
