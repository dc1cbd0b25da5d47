"""dist-opt launchers: ``dist-opt launch`` (torchrun, deepspeed, mpirun, slurm, local) over hostfiles.

Builds argv lists and environments per node (``dist_opt.launch.backends``), prints them (``--dry-run``)
or starts and supervises them (``dist_opt.launch.supervisor``), over ssh for other hosts. Never imports
torch; the ranks run ``python -m dist_opt.train CONFIG [key=value ...]``. Importing this package
is cheap (the node shim ``python -m dist_opt.launch.remote`` imports nothing else from it).
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """``dist-opt launch`` entry point (see :func:`dist_opt.launch.cli.main`)."""
    from dist_opt.launch.cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
