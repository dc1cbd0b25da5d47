"""Deprecated location of the dist-opt launcher, kept only in the source checkout.

The launcher lives in :mod:`dist_opt.launch` (``dist-opt launch`` or ``python -m dist_opt.launch``).
This directory is not part of the installed package; ``python -m launch ...`` from a checkout
still works and warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

MESSAGE = "`python -m launch` is deprecated; use `python -m dist_opt.launch` (or `dist-opt launch`)"


def main(argv: Sequence[str] | None = None) -> int:
    """Deprecated alias of :func:`dist_opt.launch.main`."""
    warnings.warn(MESSAGE, DeprecationWarning, stacklevel=2)
    from dist_opt.launch import main as launch_main

    return launch_main(argv)


__all__ = ["MESSAGE", "main"]
