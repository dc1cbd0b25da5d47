"""The large-batch study's figure (matplotlib, Agg) and markdown report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.large_batch_analysis import BatchPoint, OptimizerSummary
from bench.large_batch_run import CliResult

NOTES_MARKER = "<!-- notes: text below this line is kept when the report is regenerated -->"


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if abs(x) >= 10**digits:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _steps(x: float) -> str:
    return "✗" if not math.isfinite(x) else f"{x:g}"


def plot(summaries: Sequence[OptimizerSummary], target: float, path: str | Path | None = None) -> Any:
    """Two log-log panels: steps-to-target and examples-to-target vs global batch.

    Per optimizer: a line (label = optimizer name) through the median over seeds at the best lr,
    vertical bars for the seed range, and the dashed fit ``S_min (1 + B_crit / B)`` (label
    ``"<opt> fit"``). A dotted slope -1 line (label ``"perfect scaling"``) starts at the
    smallest-batch point of the fastest optimizer there. Returns the Figure (saved if ``path``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_b = sorted({p.batch for s in summaries for p in s.points})
    for i, s in enumerate(summaries):
        c = colors[i % len(colors)]
        pts = [p for p in s.points if p.stats is not None and p.stats.ok]
        if not pts:
            continue
        b = [p.batch for p in pts]
        med = [p.stats.median for p in pts]
        ax_s.plot(b, med, marker="o", color=c, label=s.optimizer)
        ax_e.plot(b, [m * x for m, x in zip(med, b, strict=True)], marker="o", color=c, label=s.optimizer)
        for p in pts:
            hi = p.stats.high if math.isfinite(p.stats.high) else p.stats.median
            ax_s.vlines(p.batch, p.stats.low, hi, color=c, alpha=0.5)
            ax_e.vlines(p.batch, p.stats.low * p.batch, hi * p.batch, color=c, alpha=0.5)
        if s.fit is not None:
            xs = (
                [all_b[0] * (all_b[-1] / all_b[0]) ** (k / 60) for k in range(61)]
                if len(all_b) > 1
                else all_b
            )
            ax_s.plot(xs, [s.fit.steps(x) for x in xs], "--", color=c, alpha=0.6, label=f"{s.optimizer} fit")
            ax_e.plot(
                xs, [s.fit.steps(x) * x for x in xs], "--", color=c, alpha=0.6, label=f"{s.optimizer} fit"
            )
    firsts = [
        (p.stats.median, p.batch)
        for s in summaries
        for p in s.points[:1]
        if p.stats is not None and p.stats.ok
    ]
    if firsts and len(all_b) > 1:
        s0, b0 = min(firsts)
        xs = [x for x in all_b if x >= b0]
        ax_s.plot(xs, [s0 * b0 / x for x in xs], ":", color="gray", label="perfect scaling")
        ax_e.plot(xs, [s0 * b0] * len(xs), ":", color="gray", label="perfect scaling")
    for ax, what in ((ax_s, "steps"), (ax_e, "examples")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch size B")
        ax.set_ylabel(f"{what} to target (median over seeds, best lr)")
        ax.grid(True, which="both", alpha=0.3)
    ax_s.set_title(f"steps to eval loss ≤ {target:g}")
    ax_e.set_title(f"examples to eval loss ≤ {target:g}")
    ax_s.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


@dataclass
class ReportInputs:
    command: str
    task: str
    task_overrides: list[str]
    target: float
    batches: list[int]
    seeds: int
    grid: list[float]
    spacing: float
    max_extend: int
    window: int
    eval_samples: int
    max_steps: int
    warmup_steps: int
    micro_batch: int
    optimizers: dict[str, dict[str, Any]]
    """name -> {'base_lr', 'scale_rule', 'overrides'}."""
    reference_batch: int
    runs: int
    wall_s: float
    cpu_s: float
    workers: int
    incomplete: str = ""
    machine: dict[str, str] = field(default_factory=dict)
    noise_batches: tuple[int, int, int] | None = None
    notes: list[str] = field(default_factory=list)
    about: str = ""
    """One line describing the task preset."""


def _window(p: BatchPoint) -> str:
    """``k/n (best ×a…×b)``: how many of the window's lrs reach the target, and their range vs the best."""
    if not p.window or not p.best:
        return "—"
    ok = [f for f in p.window if f in p.by_factor and p.by_factor[f].ok]
    span = f" (best ×{min(ok) / p.best:g}…×{max(ok) / p.best:g})" if ok else ""
    return f"{p.window_reaching}/{p.window_run}{span}"


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def summary_table(summaries: Sequence[OptimizerSummary]) -> list[str]:
    b0 = min((s.points[0].batch for s in summaries if s.points), default=0)
    header = [
        "optimizer",
        "S_min",
        "B_crit (fit)",
        "fit rms(log S)",
        "B_simple at target (median)",
        "B_crit / B_simple",
        f"efficiency at 16×{b0}",
        "rule-grid lrs reaching target at largest B",
        "lrs of the window around the best reaching target at largest B",
        "notes",
    ]
    rows = []
    for s in summaries:
        fit, big = s.fit, s.largest
        ratio = fit.b_crit / s.b_simple if fit is not None and s.b_simple else None
        bound = {"upper": "≥ ", "lower": "≤ "}.get(fit.at_bound, "") if fit is not None else ""
        rows.append(
            [
                s.optimizer,
                _fmt(fit.s_min if fit else None),
                "—" if fit is None else bound + _fmt(fit.b_crit),
                "—" if fit is None else f"{fit.rms_log:.2f}",
                _fmt(s.b_simple),
                _fmt(ratio, 2),
                "—" if s.efficiency16 is None else f"{100 * s.efficiency16:.0f}%",
                f"{big.lrs_reaching}/{len(big.core_factors)} (B={big.batch})",
                _window(big),
                "; ".join(s.notes),
            ]
        )
    return _table(header, rows)


def batch_table(summaries: Sequence[OptimizerSummary]) -> list[str]:
    header = [
        "optimizer",
        "B",
        "best lr (factor)",
        "steps: median [min, max]",
        "examples (median)",
        "slope to next B",
        "regime",
        "rule-grid lrs reaching target",
        "B_simple at target",
    ]
    rows = []
    for s in summaries:
        for p in s.points:
            if p.stats is None:
                best, st = "—", "✗ (no lr reached the target)"
            else:
                best = f"{p.lr:.3g} (×{p.best:g})"
                st = f"{_steps(p.stats.median)} [{_steps(p.stats.low)}, {_steps(p.stats.high)}]"
                if p.stats.reached < p.stats.total:
                    st += f" ({p.stats.reached}/{p.stats.total} seeds)"
            rows.append(
                [
                    s.optimizer,
                    p.batch,
                    best,
                    st,
                    _fmt(p.examples, 4),
                    _fmt(p.slope, 2),
                    p.regime if p.slope is not None else "—",
                    f"{p.lrs_reaching}/{len(p.core_factors)}",
                    _fmt(p.b_simple),
                ]
            )
    return _table(header, rows)


def cli_table(cli: Sequence[CliResult], inproc: dict[tuple[str, int, float, int], int | None]) -> list[str]:
    header = [
        "optimizer",
        "B",
        "ranks × micro-batch",
        "lr",
        "exit",
        "first crossing (every step evaluated)",
        "same on the in-process eval schedule",
        "in-process steps",
        "trainer's noise/b_simple at crossing",
        "wall",
    ]
    rows = []
    for c in cli:
        mine = inproc.get((c.spec.optimizer, c.spec.batch, c.spec.lr_factor, c.spec.seed))
        match = "✓" if mine is not None and c.steps_on_schedule == mine else "✗"
        rows.append(
            [
                c.spec.optimizer,
                c.spec.batch,
                f"{c.nproc} × {c.micro}",
                f"{c.spec.lr:.3g}",
                c.returncode,
                c.steps if c.steps is not None else "✗",
                f"{c.steps_on_schedule or '✗'} {match}",
                mine if mine is not None else "✗",
                _fmt(c.b_simple),
                f"{c.wall_s:.0f}s" if math.isfinite(c.wall_s) else "(reused)",
            ]
        )
    return _table(header, rows)


def findings(summaries: Sequence[OptimizerSummary]) -> list[str]:
    """Plain statements computed from the numbers (no judgement beyond thresholds stated here)."""
    out = []
    effs = [(s.efficiency16, s.optimizer) for s in summaries if s.efficiency16 is not None]
    if effs:
        e, o = max(effs)
        b0 = summaries[0].points[0].batch
        out.append(
            f"Best scaling efficiency at 16× the smallest batch ({16 * b0}): **{o}, {100 * e:.0f}%** "
            f"(goal ≥ 50%: {'met' if e >= 0.5 else 'not met'}); all: "
            + ", ".join(f"{oo} {100 * ee:.0f}%" for ee, oo in sorted(effs, reverse=True))
            + "."
        )
    for s in summaries:
        slopes = [p.slope for p in s.points if p.slope is not None]
        if not slopes:
            continue
        regimes = [p.regime for p in s.points if p.slope is not None]
        knee = next((p.batch for p in s.points if p.slope is not None and p.slope > -0.8), None)
        seq = " → ".join(dict.fromkeys(regimes))
        out.append(
            f"{s.optimizer}: first slope {slopes[0]:.2f}, last {slopes[-1]:.2f}; regimes {seq}"
            + (f"; perfect scaling ends at B≈{knee}" if knee is not None and regimes[0] == "perfect" else "")
            + "."
        )
    big = [(s.optimizer, s.largest) for s in summaries]
    if big:
        out.append(
            f"At the largest batch ({big[0][1].batch}), learning rates of the scale rule's grid that reach "
            "the target: " + ", ".join(f"{o} {p.lrs_reaching}/{len(p.core_factors)}" for o, p in big) + "."
        )
        wins = [(o, p) for o, p in big if p.window]
        if wins:
            out.append(
                "Stable-lr window at the largest batch (lrs around each optimizer's best, ×2 apart, whose "
                "median reaches the target): "
                + ", ".join(f"{o} {p.window_reaching}/{p.window_run}" for o, p in wins)
                + "."
            )
    pairs = [
        (s.optimizer, s.fit.b_crit / s.b_simple)
        for s in summaries
        if s.fit is not None and s.b_simple and not s.fit.at_bound
    ]
    if pairs:
        within = [o for o, r in pairs if 1 / 3 <= r <= 3]
        out.append(
            "B_crit (fit) / B_simple: "
            + ", ".join(f"{o} {r:.2f}" for o, r in pairs)
            + f"; within a factor of 3 for {len(within)}/{len(pairs)} optimizers."
        )
    return out


SETUP = """\
- Task: `{task}` with {task_overrides}.
- Target: held-out eval loss <= **{target:g}**, i.e. `Trainer.evaluate`'s summed loss over count on the
  first {eval_samples} held-out samples: a fixed eval set, fetched once per run (deterministic). Evaluated
  after every step up to step 100, then every ceil(step/100) steps, so a reported step count is at most 1%
  above the first crossing. A run stops at the target; when the eval loss exceeds 3x its initial value or
  becomes non-finite (diverged); from step 200 on, when the second half of the run brought no new best eval
  loss (stalled: a noise floor above the target, typical of too large an lr); or after {max_steps} steps
  (budget). Only runs that reach the target count.
- Batches: {batches}; seeds: {seeds} (a seed sets the teacher, the init and the data order).
- Optimizers (base lr at the reference batch from a coarse hand search there, then scaled by the rule):
  {optimizers}.
- LR grid per (optimizer, batch): the rule's lr times {grid}; while the best median sits at an edge of
  what was run, the grid is extended by x{spacing:g} steps (at most {max_extend}). Best lr = smallest median
  steps over seeds (a seed that misses the target counts as infinite); "rule-grid lrs" counts the core grid.
{window_line}\
- Schedule: constant lr after {warmup} linear warmup steps; micro-batch <= {micro} (accumulation above).
- {runs} runs, {cpu_min:.1f} CPU-minutes of training, {wall_min:.1f} min wall clock on {workers} worker
  processes (including the multi-rank check){incomplete}.
"""

METHOD = """\
## How the runs are executed

Most points run in-process as a world of one: a real gloo group of size 1, a real `dist_opt.train.Trainer`
with the sharded optimizer engine, and our own loop around `Trainer.train_step` so that a run can stop at
the target. That is legitimate because dist-opt computes the same update for the same global batch whatever
the number of ranks and micro-steps (`tests/test_train.py::test_two_and_three_ranks_equal_one_process`). To
show it on the sweep itself, the points of the multi-rank table were re-run through the real CLI (`python -m
dist_opt.train ... distributed.nproc=2`: torchrun's API, 2 gloo ranks) with an evaluation after every step;
the crossing step they report must equal the in-process one.

B_simple (McCandlish et al. 2018; docs/algorithms.md, section 7) is logged by the trainer only when world > 1
(`noise/b_simple`, from the per-rank and the reduced gradient). For the in-process runs it is measured when
a run reaches the target, with the same estimator (`dist_opt.noise_scale.NoiseScale.estimates`) applied to
{noise} (the ratio of the means over draws). The multi-rank table also shows the trainer's own value at the
crossing step (2 ranks: B_small = B/2, B_big = B). That one is an EMA over the last ~20 steps of a short
run, dominated by earlier steps with a larger gradient, so it reads lower than the value at the target.
"""


def markdown(
    inp: ReportInputs,
    summaries: Sequence[OptimizerSummary],
    cli: Sequence[CliResult],
    inproc_steps: dict[tuple[str, int, float, int], int | None],
    plot_name: str,
    keep_notes: str = "",
    extra: Sequence[str] = (),
) -> str:
    """The whole report (the text after :data:`NOTES_MARKER` in ``keep_notes`` is appended verbatim)."""
    opts = ", ".join(
        f"{k} (lr {v['base_lr']:g}, {v['scale_rule']} rule"
        + "".join(f", `{o}`" for o in v.get("overrides", []))
        + ")"
        for k, v in inp.optimizers.items()
    )
    nb = inp.noise_batches
    window = ""
    if inp.window:
        window = (
            f"- Stable-lr window: at the largest batch each optimizer also runs its best lr "
            f"x{inp.spacing:g}^k\n  for |k| <= {inp.window} (all seeds), to count how wide the range of lrs "
            "reaching the target is,\n  whatever the scale rule guessed.\n"
        )
    setup = SETUP.format(
        task=inp.task,
        task_overrides=", ".join(f"`{o}`" for o in inp.task_overrides) or "its defaults",
        target=inp.target,
        eval_samples=inp.eval_samples,
        max_steps=inp.max_steps,
        batches=", ".join(map(str, inp.batches)),
        seeds=inp.seeds,
        optimizers=opts + f" (reference batch {inp.reference_batch})",
        grid=", ".join(f"x{f:g}" for f in inp.grid),
        spacing=inp.spacing,
        max_extend=inp.max_extend,
        window_line=window,
        warmup=inp.warmup_steps,
        micro=inp.micro_batch,
        runs=inp.runs,
        cpu_min=inp.cpu_s / 60,
        wall_min=inp.wall_s / 60,
        workers=inp.workers,
        incomplete=f" -- **incomplete: {inp.incomplete}**" if inp.incomplete else "",
    )
    noise = (
        f"{nb[2]} draws of {nb[1]} fresh training samples, each split into {nb[1] // nb[0]} simulated ranks "
        f"of {nb[0]}"
        if nb
        else "nothing (disabled with --noise-batches none)"
    )
    lines = [
        "# Large-batch study: steps to target vs batch size",
        "",
        "Generated by `bench/large_batch.py`; every number comes from real dist-opt training",
        "runs.",
        "Reproduce with:",
        "",
        "```",
        inp.command,
        "```",
        "",
        "## Setup",
        "",
        *([f"- Preset: {inp.about}."] if inp.about else []),
        setup.rstrip("\n"),
        *([f"- Machine: {', '.join(f'{k} {v}' for k, v in inp.machine.items())}."] if inp.machine else []),
        *[f"- Note: {n}." for n in inp.notes],
        "",
        METHOD.format(noise=noise).rstrip("\n"),
        "",
        f"![steps and examples to target]({plot_name})",
        "",
        "## Per optimizer: fit S = S_min (1 + B_crit / B) and B_simple",
        "",
        *summary_table(summaries),
        "",
        "Efficiency at 16x = (S(B0) / S(16 B0)) / 16 with B0 the smallest batch (1 = perfect scaling).",
        "B_simple: median over batches of the per-batch medians (runs at the best lr).",
        "",
        "## Findings (computed from the tables)",
        "",
        *[f"- {x}" for x in findings(summaries)],
        "",
        "## Per batch",
        "",
        *batch_table(summaries),
        "",
        "Regimes by local slope d log S / d log B: perfect <= -0.8 < diminishing < -0.2 <= plateau.",
        "",
    ]
    if cli:
        lines += ["## Multi-rank check (real CLI, 2 ranks)", "", *cli_table(cli, inproc_steps), ""]
    lines += [*extra, NOTES_MARKER, keep_notes.rstrip() + "\n" if keep_notes.strip() else ""]
    return "\n".join(lines)


def kept_notes(path: Path) -> str:
    """The hand-written text after :data:`NOTES_MARKER` in an existing report (empty if none)."""
    if not path.exists():
        return ""
    text = path.read_text(encoding="utf-8")
    _, sep, tail = text.partition(NOTES_MARKER)
    return tail.strip("\n") if sep else ""
