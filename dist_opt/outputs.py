"""Writing a command's output files: one line and exit code 2 when the file cannot be written."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


def write_outputs(prog: str, path: str | Path, write: Callable[[], object]) -> int:
    """Run ``write`` (which writes ``path`` and perhaps more); 0 and ``wrote PATH``, or 2 and one line."""
    try:
        write()
    except OSError as e:
        print(f"{prog}: error: cannot write {e.filename or path}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
