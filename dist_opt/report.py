"""``dist-opt report RUN_DIR [RUN_DIR ...] --out plot.png``: compare runs from their ``metrics.jsonl``.

One panel per ``--metric`` (default ``loss``; repeat the flag for more panels), ``--x`` on the
horizontal axis (default ``step``; any logged key, e.g. ``samples``), one line per run labelled
with the run directory's name. Points whose metric is missing or non-finite are left out (skipped
steps). ``--markdown PATH`` (``-``: stdout) also writes a table of the last and best (min) values.
Drawn with matplotlib's Agg canvas, without pyplot (no global state, no display needed).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeGuard

from dist_opt.outputs import write_outputs
from dist_opt.tracking.metrics_file import read_metrics

METRICS_FILE = "metrics.jsonl"


class ReportError(Exception):
    """A bad run directory or a metric no run has; ``main`` turns it into exit code 2."""


def _number(v: Any) -> TypeGuard[float]:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def load_run(run_dir: str | Path) -> list[dict]:
    """The metric lines (not event lines) of ``<run_dir>/metrics.jsonl``."""
    path = Path(run_dir) / METRICS_FILE
    if not Path(run_dir).is_dir():
        raise ReportError(f"{run_dir}: not a directory")
    if not path.is_file():
        raise ReportError(f"{run_dir}: no {METRICS_FILE} (not a dist-opt run directory?)")
    try:
        rows = read_metrics(path)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise ReportError(str(e)) from None
    return [r for r in rows if "event" not in r]


def series(rows: Sequence[dict], metric: str, x: str) -> tuple[list[float], list[float]]:
    """``(xs, ys)`` over rows whose metric is a finite number, in file order.

    The x value comes from the row itself or, when it lacks ``x``, from another line of the same step
    (an eval line logged at step s is placed at the ``samples`` of the train line of step s).
    """
    by_step: dict[Any, dict] = {}
    for r in rows:
        if "step" in r:
            by_step.setdefault(r["step"], {}).update(r)
    xs: list[float] = []
    ys: list[float] = []
    for r in rows:
        xv = r.get(x, by_step.get(r.get("step"), {}).get(x))
        if _number(r.get(metric)) and _number(xv):
            xs.append(xv)
            ys.append(r[metric])
    return xs, ys


def _labels(run_dirs: Sequence[str | Path]) -> list[str]:
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(d) for d in run_dirs]


def make_figure(run_dirs: Sequence[str | Path], metric: str | Sequence[str] = "loss", x: str = "step") -> Any:
    """A matplotlib ``Figure``: one axes per metric, one line per run that has it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = [metric] if isinstance(metric, str) else list(metric)
    if not metrics:
        raise ReportError("no metric to plot")
    runs = [load_run(d) for d in run_dirs]
    labels = _labels(run_dirs)
    fig = Figure(figsize=(8, 3.5 * len(metrics)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    for ax, m in zip(axes, metrics, strict=True):
        for rows, label in zip(runs, labels, strict=True):
            xs, ys = series(rows, m, x)
            if xs:  # markers keep sparse series (a few evals, a single point) visible
                ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 50 else None, markersize=3)
        if not ax.get_lines():
            keys = sorted({k for rows in runs for r in rows for k in r})
            raise ReportError(
                f"no run has metric {m!r} against {x!r} (logged keys: {', '.join(keys) or 'none'})"
            )
        ax.set_xlabel(x)
        ax.set_ylabel(m)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def markdown_table(run_dirs: Sequence[str | Path], metrics: Sequence[str], x: str = "step") -> str:
    """Markdown table: per run the last ``x`` and, per metric, the last and the min value."""
    head = ["run", f"last {x}"] + [f"{m} {k}" for m in metrics for k in ("last", "min")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d, label in zip(run_dirs, _labels(run_dirs), strict=True):
        rows = load_run(d)
        xs = [r[x] for r in rows if _number(r.get(x))]
        cells = [label, f"{xs[-1]:g}" if xs else "-"]
        for m in metrics:
            _, ys = series(rows, m, x)
            cells += [f"{ys[-1]:.6g}", f"{min(ys):.6g}"] if ys else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dist-opt report", description="Plot metrics.jsonl of runs, one line per run."
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (run.out_dir)")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument(
        "--metric",
        action="append",
        default=None,
        help="metric to plot (repeatable; one panel each; default: loss)",
    )
    p.add_argument("--x", default="step", help="x axis key (default: step; e.g. samples)")
    p.add_argument(
        "--markdown", default=None, metavar="PATH", help="also write a summary table (- for stdout)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dist-opt report`` (``argv`` without the ``report`` word)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage error
        return int(e.code or 0)
    metrics = args.metric or ["loss"]
    try:
        fig = make_figure(args.run_dirs, metrics, args.x)
        table = markdown_table(args.run_dirs, metrics, args.x) if args.markdown else None
    except ReportError as e:
        print(f"dist-opt report: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)

    def write() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png", dpi=100)
        if table is not None:
            if args.markdown == "-":
                sys.stdout.write(table)
            else:
                Path(args.markdown).write_text(table, encoding="utf-8")

    return write_outputs("dist-opt report", out, write)


if __name__ == "__main__":
    raise SystemExit(main())
