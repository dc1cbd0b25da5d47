"""``dist-opt schedule CONFIG [k=v ...] [--plot lr.png] [--steps-per-epoch N]``: look at the lr before launching.

Prints the lr at ~20 steps of the run (and with ``--plot`` draws lr vs step to a PNG). Plateau
decays depend on evaluation losses, which cannot be known in advance: they are not drawn.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dist_opt.config.loader import ConfigError, load_config
from dist_opt.config.schema import Config
from dist_opt.outputs import write_outputs
from dist_opt.schedules import lr_trace, scaled_lr

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TABLE_POINTS = 20


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-opt schedule", description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--plot", metavar="PNG", help="write a PNG of lr vs step")
    p.add_argument(
        "--steps-per-epoch",
        type=int,
        metavar="N",
        help="optimizer steps per epoch (default: task train size // data.global_batch)",
    )
    return p


def _task_steps_per_epoch(cfg: Config) -> int | None:
    """Steps per epoch of the configured task (drop-last), or None for an unlimited stream."""
    from dist_opt.tasks import build_task  # lazy: builds datasets

    size = build_task(cfg.task, cfg.run.seed).train_size
    if size is None:
        return None
    spe = size // cfg.data.global_batch
    if spe < 1:
        raise ConfigError(
            [
                f"data.global_batch: {cfg.data.global_batch} exceeds the training set size {size} "
                f"of task {cfg.task.name}"
            ]
        )
    return spe


def run_length(cfg: Config, steps_per_epoch: int | None) -> tuple[int | None, int]:
    """(steps per epoch, total optimizer steps) of the run; train.steps wins over train.epochs."""
    s = cfg.schedule
    needs_epochs = (cfg.train.steps is None) or (s.name in ("step", "multistep") and not s.per_step)
    if steps_per_epoch is None and needs_epochs:
        steps_per_epoch = _task_steps_per_epoch(cfg)
    if cfg.train.steps is not None:
        return steps_per_epoch, cfg.train.steps
    if steps_per_epoch is None:
        raise ConfigError([f"train.epochs: task {cfg.task.name} is an unlimited stream; set train.steps"])
    assert cfg.train.epochs is not None
    return steps_per_epoch, cfg.train.epochs * steps_per_epoch


def table_steps(total: int, warmup: int, points: int = TABLE_POINTS) -> list[int]:
    """About ``points`` steps spread over 1..total, plus the last warmup step and the first after it."""
    steps = {1 + round(i * (total - 1) / (points - 1)) for i in range(points)}
    steps |= {t for t in (warmup, warmup + 1) if 1 <= t <= total and warmup > 0}
    return sorted(steps)


def plot_lr(lrs: Sequence[float], path: str | Path, title: str) -> Figure:
    """Draw lr vs step (1-based) into a PNG at ``path``; returns the figure."""
    from matplotlib.figure import Figure  # lazy: optional dependency (extra "plot")

    fig = Figure(figsize=(7, 3.5), dpi=100)
    ax = fig.add_subplot()
    ax.plot(range(1, len(lrs) + 1), list(lrs), lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return fig


def _describe(cfg: Config, total: int, spe: int | None) -> str:
    s = cfg.schedule
    base = scaled_lr(cfg, cfg.data.global_batch)
    scale = (
        ""
        if s.scale_rule == "none"
        else (
            f" = optimizer.lr {cfg.optimizer.lr:g} x {s.scale_rule}({cfg.data.global_batch}/{s.reference_batch})"
        )
    )
    warm = (
        ""
        if s.warmup_steps == 0 or s.name == "noam"
        else (f", warmup {s.warmup_steps} steps from {s.warmup_start_factor:g}x")
    )
    epochs = f", {spe} steps/epoch" if spe else ""
    return f"schedule {s.name}: base lr {base:.6g}{scale}{warm}, {total} steps{epochs}"


def main(argv: list[str]) -> int:
    """Entry point of ``dist-opt schedule`` (``argv`` excludes the subcommand word)."""
    try:
        args = _parser().parse_intermixed_args(argv)
    except SystemExit as e:  # argparse already printed usage / help
        return int(e.code or 0)
    if args.plot is not None:
        parent = Path(args.plot).resolve().parent
        if not parent.is_dir():
            print(f"error: --plot {args.plot}: directory {parent} does not exist", file=sys.stderr)
            return 2
    if args.steps_per_epoch is not None and args.steps_per_epoch < 1:
        print(f"error: --steps-per-epoch must be >= 1 (got {args.steps_per_epoch})", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        spe, total = run_length(cfg, args.steps_per_epoch)
        lrs = lr_trace(cfg, spe, total)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2

    print(_describe(cfg, total, spe))
    if cfg.schedule.name == "plateau":
        print("(plateau: lr drops depend on eval losses and are not shown)")
    width = max(4, len(str(total)))
    print(f"{'step':>{width}}  lr")
    for t in table_steps(total, cfg.schedule.warmup_steps):
        print(f"{t:>{width}}  {lrs[t - 1]:.6g}")
    peak = max(lrs)
    print(f"peak {peak:.6g} at step {lrs.index(peak) + 1}, last {lrs[-1]:.6g}")
    if args.plot is None:
        return 0
    return write_outputs(
        "dist-opt schedule", args.plot, lambda: plot_lr(lrs, args.plot, _describe(cfg, total, spe))
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
