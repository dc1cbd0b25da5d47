"""Is ``run.out_dir`` usable? Checked before any rank starts and again by rank 0 when the run opens it.

:func:`run_dir_problem` looks without writing anything: the path must be a directory this process can
write into, or a path whose nearest existing ancestor is a writable directory (it is created then).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

_CHOOSE = "(choose another run.out_dir)"


def run_dir_problem(path: str | os.PathLike) -> str | None:
    """One line naming ``run.out_dir`` and the path if it cannot be used as the run directory, else None."""
    p = Path(path).expanduser()
    if p.exists() or p.is_symlink():
        return _unusable(p, p, "")
    for parent in p.absolute().parents:
        if parent.exists() or parent.is_symlink():  # the first existing ancestor must take the new folder
            return _unusable(parent, p, f"cannot create {p}: ")
    return f"run.out_dir: cannot create {p}: no existing parent directory"  # pragma: no cover


def _unusable(d: Path, p: Path, prefix: str) -> str | None:
    if not d.is_dir():
        return f"run.out_dir: {prefix}{d} {'exists and ' if d == p else ''}is not a directory {_CHOOSE}"
    if not os.access(d, os.W_OK | os.X_OK):
        return f"run.out_dir: {prefix}cannot write {d}: {_why(d)} {_CHOOSE}"
    return None


def _why(path: Path) -> str:
    """The reason a directory is not writable, in the words of the matching OSError."""
    try:
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return os.strerror(errno.EROFS if read_only else errno.EACCES)


def open_problem(path: str | os.PathLike, e: OSError) -> str:
    """The line for a run directory that passed :func:`run_dir_problem` but could not be written."""
    return f"run.out_dir: cannot write {path}: {e.strerror or e} {_CHOOSE}"
