"""``dist-opt`` command line: train, launch, schedule, report, init, export; ``--version``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

USAGE = """usage: dist-opt COMMAND ... | --version

commands:
  init [NAME] [--out FILE] [--force] [--list] write a starter config (default quickstart)
  train CONFIG [k=v ...] [--print-config]   train (under a launcher, or starting distributed.nproc local ranks)
  launch [options] CONFIG [k=v ...]         start ranks on one or many nodes (torchrun|deepspeed|mpirun|slurm|local)
  schedule CONFIG [k=v ...] [--plot PNG]    show the learning-rate schedule of a config
  report RUN_DIR [RUN_DIR ...] --out PNG    plot metrics of runs
  plan RUN_DIR [--gpus 8,64,512] [--batches ...] [--cost-model FILE] [--plot PNG]
                                            predict time and cost to target per batch and GPU count
  export RUN_DIR --out FILE [--step N] [--swa] [--force]
                                            write a checkpoint's model as a plain state_dict file
"""


COMMANDS = {
    "train": "dist_opt.train",
    "launch": "dist_opt.launch.cli",
    "schedule": "dist_opt.schedule_cli",
    "init": "dist_opt.init_cli",
    "report": "dist_opt.report",
    "plan": "dist_opt.plan.cli",
    "export": "dist_opt.export_cli",
}
"""command -> the module whose ``main(argv) -> int`` runs it (imported only when used)."""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from dist_opt._version import version

        print(f"dist-opt {version()}")
        return 0
    cmd, rest = args[0], args[1:]
    target = COMMANDS.get(cmd)
    if target is not None:
        module = importlib.import_module(target)
        return int(module.main(rest))
    print(f"dist-opt: unknown command {cmd!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
