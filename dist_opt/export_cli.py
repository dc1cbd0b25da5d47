"""``dist-opt export RUN_DIR --out FILE [--step N] [--swa] [--force]`` (see :mod:`dist_opt.checkpoint.export`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dist-opt export",
        description="Write a run's checkpointed model as a plain state_dict file "
        "(torch.load(FILE, weights_only=True), then model.load_state_dict).",
    )
    p.add_argument("run_dir", help="run folder (run.out_dir), its checkpoints folder, or one step-N folder")
    p.add_argument("--out", required=True, help="file to write (refused if it exists, unless --force)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest complete)")
    p.add_argument("--swa", action="store_true", help="the SWA/EMA average instead of the live weights")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 on success, 2 on bad input (one line on stderr, nothing written)."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from dist_opt.checkpoint.export import ExportError, export

    try:
        folder, step, n = export(args.run_dir, args.out, step=args.step, swa=args.swa, force=args.force)
    except ExportError as e:
        print(f"dist-opt export: {e}", file=sys.stderr)
        return 2
    what = "SWA average" if args.swa else "model"
    print(f"dist-opt export: wrote {args.out} ({what}, {n} tensors, step {step}, from {folder})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
