"""Is ``run.out_dir`` usable? Checked before any rank starts and again by rank 0 when the run opens it.

:func:`run_dir_problem` looks without writing anything: the path must be a directory this process can
write into, or a path whose nearest existing ancestor is a writable directory (it is created then).
"""

from __future__ import annotations

import os
from pathlib import Path


def run_dir_problem(path: str | os.PathLike) -> str | None:
    """One line naming ``run.out_dir`` and the path if it cannot be used as the run directory, else None."""
    p = Path(path).expanduser()
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            return f"run.out_dir: {p} exists and is not a directory (choose another run.out_dir)"
        if not os.access(p, os.W_OK | os.X_OK):
            return f"run.out_dir: {p} is not writable (choose another run.out_dir)"
        return None
    for parent in p.absolute().parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                return f"run.out_dir: cannot create {p}: {parent} is not a directory (choose another run.out_dir)"
            if not os.access(parent, os.W_OK | os.X_OK):
                return (
                    f"run.out_dir: cannot create {p}: {parent} is not writable (choose another run.out_dir)"
                )
            return None
    return f"run.out_dir: cannot create {p}: no existing parent directory"  # pragma: no cover


def open_problem(path: str | os.PathLike, e: OSError) -> str:
    """The line for a run directory that passed :func:`run_dir_problem` but could not be written."""
    return f"run.out_dir: cannot write to {path}: {e.strerror or e} (choose another run.out_dir)"
