"""``dist-opt`` command line: train, launch, schedule, report, init, export; ``--version``."""

from __future__ import annotations

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
    if cmd == "train":
        from dist_opt.train import main as train_main

        return train_main(rest)
    if cmd == "launch":
        from dist_opt.launch.cli import main as launch_main

        return launch_main(rest)
    if cmd == "schedule":
        from dist_opt.schedule_cli import main as schedule_main

        return schedule_main(rest)
    if cmd == "init":
        from dist_opt.init_cli import main as init_main

        return init_main(rest)
    if cmd == "report":
        from dist_opt.report import main as report_main

        return report_main(rest)
    if cmd == "plan":
        from dist_opt.plan.cli import main as plan_main

        return plan_main(rest)
    if cmd == "export":
        from dist_opt.export_cli import main as export_main

        return export_main(rest)
    print(f"dist-opt: unknown command {cmd!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
