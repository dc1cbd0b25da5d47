"""The network presets of the large-batch study (``--preset lm`` / ``--preset cnn``) and their extra report
sections: the trainer's online B_simple per batch, and the planner check (steps predicted from the B_simple
of the smallest batch's run with :func:`dist_opt.noise_scale.relative_steps`, against the measured ones).

- ``lm``: the built-in byte-level GPT (``stdlib_lm``) shrunk to 1 block of width 32 on 32-byte sequences
  from 40 stdlib files; target a held-out loss; AdamW vs LAMB with the square-root lr rule.
- ``cnn``: a ResNet with BatchNorm (:mod:`bench.large_batch_cnn`, a user task through the Task API) on the
  built-in 8x8 digits; target a held-out accuracy (as the error 1 - accuracy); momentum SGD vs LARS with the
  linear lr rule, and LAMB with the square-root rule.

Both warm up over ``--warmup-steps x sqrt(B / B0)`` steps and run every batch with a micro-batch of at most
B/2, so that the trainer measures B_simple on one rank at every batch (:mod:`dist_opt.noise_probe`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from bench.large_batch_analysis import OptimizerSummary, factor_key
from bench.large_batch_run import REACHED, RunResult
from dist_opt.noise_scale import relative_steps

_COMMON: dict[str, Any] = {
    "batches": (16, 32, 64, 128, 256, 512),
    "reference_batch": 16,
    "warmup_rule": "sqrt",
    "probe": True,
}
_DEFAULTS = {
    "seeds": 2,
    "grid_points": 3,
    "grid_spacing": 2.0,
    "max_extend": 2,
    "window": 2,
    "warmup_steps": 2,
    "micro_batch": 64,
    "noise_batches": "none",
    "budget_minutes": 45.0,
    "nproc": 2,
}

NETWORK_PRESETS: dict[str, dict[str, Any]] = {
    "lm": {
        **_COMMON,
        "task_name": "stdlib_lm",
        "overrides": (
            "task.seq_len=32",
            "task.d_model=32",
            "task.n_layers=1",
            "task.n_heads=2",
            "task.max_files=40",
        ),
        "metric": "loss",
        "target": 2.3,
        "max_steps": 800,
        "eval_samples": 256,
        "lrs": {"adamw": 0.002, "lamb": 0.012, "adam": 0.002},
        "about": "byte-level GPT (1 block, width 32, 2 heads, 32-byte sequences, 30k parameters) on 40 stdlib "
        "files (24685 training / 2649 held-out sequences); target: held-out loss 2.3 nats/byte on the first "
        "256 held-out sequences",
        "defaults": tuple(
            {
                **_DEFAULTS,
                "optimizers": "adamw,lamb",
                "multirank_batches": "64",
                "multirank_optimizers": "adamw",
                "out": "bench/results/large_batch_lm.md",
                "work_dir": "runs/large_batch_lm",
            }.items()
        ),
    },
    "cnn": {
        **_COMMON,
        "task_name": "bench.large_batch_cnn:make_task",
        "overrides": (),
        "metric": "error",
        "target": 0.05,
        "max_steps": 800,
        "eval_samples": 360,
        "lrs": {"momentum": 0.05, "sgd": 0.5, "lars": 0.01, "lamb": 0.01},
        "about": "ResNet with BatchNorm (stem + 2 basic blocks, width 8/16, 5k parameters; "
        "bench/large_batch_cnn.py) on the 8x8 digits (1437 training / 360 held-out images); target: held-out "
        "accuracy 95%, i.e. error (1 - accuracy) <= 0.05 on all 360 held-out images",
        "defaults": tuple(
            {
                **_DEFAULTS,
                "optimizers": "momentum,lars,lamb",
                "multirank_batches": "64",
                "multirank_optimizers": "momentum",
                "out": "bench/results/large_batch_cnn.md",
                "work_dir": "runs/large_batch_cnn",
            }.items()
        ),
    },
}


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"  # noqa: E731
    return [line(header), line(["---"] * len(header)), *(line(r) for r in rows)]


def _best_runs(results: Iterable[RunResult], s: OptimizerSummary) -> dict[int, list[RunResult]]:
    """batch -> the runs (all seeds) at that batch's best lr factor."""
    best = {p.batch: p.best for p in s.points if p.best is not None}
    out: dict[int, list[RunResult]] = {}
    for r in results:
        sp = r.spec
        if sp.optimizer == s.optimizer and best.get(sp.batch) == factor_key(sp.lr_factor):
            out.setdefault(sp.batch, []).append(r)
    return out


def _median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else None


def online_table(results: Sequence[RunResult], summaries: Sequence[OptimizerSummary]) -> list[str]:
    """The trainer's ``noise/b_simple`` per (optimizer, batch): at the crossing and over the run."""
    rows = []
    for s in summaries:
        for b, runs in sorted(_best_runs(results, s).items()):
            ok = [r for r in runs if r.status == REACHED and r.b_simple_online]
            at_cross = _median([r.b_simple_online[-1][1] for r in ok])
            quarter = _median([r.b_simple_online[len(r.b_simple_online) // 4][1] for r in ok])
            half = _median([r.b_simple_online[len(r.b_simple_online) // 2][1] for r in ok])
            micro = runs[0].spec.micro_batch
            rows.append(
                [s.optimizer, b, f"{micro} x {b // micro}", _fmt(quarter), _fmt(half), _fmt(at_cross)]
            )
    return _table(
        [
            "optimizer",
            "B",
            "micro-batch x micro-steps",
            "B_simple at 1/4 of the run",
            "at 1/2",
            "at the crossing (median over seeds)",
        ],
        rows,
    )


def planner_rows(summary: OptimizerSummary) -> list[list[object]]:
    """Predicted S(B) = S(B0) x relative_steps(B, B0, B_simple(B0)) vs the measured median, per batch."""
    p0 = summary.points[0]
    if p0.stats is None or not p0.stats.ok or p0.b_simple is None:
        return []
    rows = []
    for p in summary.points:
        pred = p0.stats.median * relative_steps(p.batch, p0.batch, p0.b_simple)
        meas = p.stats.median if p.stats is not None and p.stats.ok else None
        ratio = pred / meas if meas else None
        rows.append(
            [summary.optimizer, p.batch, _fmt(p0.b_simple), f"{pred:.0f}", _fmt(meas, 4), _fmt(ratio, 3)]
        )
    return rows


def planner_table(summaries: Sequence[OptimizerSummary]) -> list[str]:
    rows = [r for s in summaries for r in planner_rows(s)]
    return _table(
        [
            "optimizer",
            "B",
            "B_simple of the B0 run",
            "predicted steps",
            "measured steps (median)",
            "predicted / measured",
        ],
        rows,
    )


def planner_summary(summaries: Sequence[OptimizerSummary]) -> list[str]:
    """One line per optimizer: the geometric mean and the range of predicted/measured over batches."""
    out = []
    for s in summaries:
        ratios = [float(str(r[5])) for r in planner_rows(s) if r[5] != "—"]
        if len(ratios) < 2:
            continue
        gm = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        out.append(
            f"{s.optimizer}: predicted/measured {min(ratios):.2f}…{max(ratios):.2f} "
            f"(geometric mean {gm:.2f}; at the largest batch {ratios[-1]:.2f})."
        )
    return out


def network_sections(
    plan: Any, results: Iterable[RunResult], summaries: Sequence[OptimizerSummary]
) -> list[str]:
    """Markdown lines appended to the report of a network preset."""
    results = list(results)
    what = "held-out loss" if plan.metric == "loss" else "held-out error (1 - accuracy)"
    warm = ", ".join(f"{b}: {plan.warmup(b)}" for b in plan.batches)
    lines = [
        "## What this preset changes",
        "",
        f'- The target bounds the **{what}** (the setup above says "eval loss" for the quadratic).',
        f"- Warmup grows with the batch: {plan.warmup_steps} x sqrt(B / {plan.reference_batch}) linear "
        f"warmup steps (B: steps = {warm}); constant lr after it.",
        "- B_simple is the trainer's own `noise/b_simple`, logged online at every batch on one rank: the "
        "micro-batch is at most B/2, each micro-step's gradient is the small batch and the accumulated "
        "one the big batch (`dist_opt/noise_probe.py`; EMA of `tracking.noise_scale_ema`). The B_simple "
        "columns of the tables above are its value at the crossing step.",
        "",
        "## Online B_simple per batch (runs at the best lr)",
        "",
        *online_table(results, summaries),
        "",
        "## Planner check: steps predicted from the smallest batch's B_simple",
        "",
        "Predicted S(B) = S(B0) x `dist_opt.noise_scale.relative_steps(B, B0, B_simple(B0))`, with S(B0) the",
        "measured median at the smallest batch and B_simple(B0) the trainer's value at its crossing (median",
        "over seeds at the best lr). A ratio above 1 means the planner is too pessimistic at that batch.",
        "",
        *planner_table(summaries),
        "",
        *[f"- {x}" for x in planner_summary(summaries)],
        "",
    ]
    return lines
