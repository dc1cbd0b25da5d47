"""Sweep results -> per-optimizer, per-batch summaries (best lr over the grid, seed statistics,
the critical-batch fit, scaling efficiency, stable-lr counts, B_simple). No torch, no I/O."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bench.large_batch_fit import (
    CriticalFit,
    SeedStats,
    best_factor,
    fit_critical_batch,
    local_slopes,
    regime,
    scaling_efficiency,
    seed_stats,
)
from bench.large_batch_run import REACHED, RunResult


def factor_key(f: float) -> float:
    """Grid factors as dictionary keys, robust to float noise (2**k products)."""
    return float(f"{f:.6g}")


@dataclass
class BatchPoint:
    optimizer: str
    batch: int
    by_factor: dict[float, SeedStats]
    core_factors: list[float]
    best: float | None
    """Best lr factor (None: no lr reached the target on the median)."""
    lr: float | None
    """The learning rate (after the scale rule) of the best factor."""
    stats: SeedStats | None
    b_simple: float | None
    """Median over seeds of B_simple measured where the best-lr runs reached the target."""
    slope: float | None = None
    """d log S / d log B towards the next larger batch."""
    window: list[float] = field(default_factory=list)
    """lr factors best x spacing^k, k = -w..w (the stable-lr window; largest batch only)."""

    @property
    def regime(self) -> str:
        return regime(self.slope)

    @property
    def lrs_reaching(self) -> int:
        """Core-grid lrs whose median over seeds reaches the target."""
        return sum(1 for f in self.core_factors if f in self.by_factor and self.by_factor[f].ok)

    @property
    def window_reaching(self) -> int:
        """lrs of the window around the best whose median over seeds reaches the target."""
        return sum(1 for f in self.window if f in self.by_factor and self.by_factor[f].ok)

    @property
    def window_run(self) -> int:
        return sum(1 for f in self.window if f in self.by_factor)

    @property
    def examples(self) -> float | None:
        return None if self.stats is None or not self.stats.ok else self.stats.median * self.batch


@dataclass
class OptimizerSummary:
    optimizer: str
    points: list[BatchPoint]
    fit: CriticalFit | None
    efficiency16: float | None
    b_simple: float | None
    """Median of the per-batch B_simple values (runs at the best lr, at the target)."""
    notes: list[str] = field(default_factory=list)

    @property
    def batches(self) -> list[int]:
        return [p.batch for p in self.points]

    @property
    def medians(self) -> list[float | None]:
        return [p.stats.median if p.stats is not None and p.stats.ok else None for p in self.points]

    @property
    def largest(self) -> BatchPoint:
        return self.points[-1]


def window_factors(best: float, spacing: float, width: int) -> list[float]:
    """``best * spacing**k`` for k = -width..width (as factor keys)."""
    return [factor_key(best * spacing**k) for k in range(-width, width + 1)]


def summarize(
    results: Iterable[RunResult], core_factors: Sequence[float], spacing: float = 2.0, window: int = 0
) -> list[OptimizerSummary]:
    """Group runs by (optimizer, batch, lr factor) and summarise; optimizers in first-seen order.
    With ``window`` > 0 the largest batch's point also gets its stable-lr window around the best lr."""
    core = sorted(factor_key(f) for f in core_factors)
    runs: dict[str, dict[int, dict[float, list[RunResult]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in results:
        runs[r.spec.optimizer][r.spec.batch][factor_key(r.spec.lr_factor)].append(r)
    out = []
    for opt, by_batch in runs.items():
        points = []
        for b in sorted(by_batch):
            by_factor = {f: seed_stats([x.steps for x in rs]) for f, rs in sorted(by_batch[b].items())}
            best = best_factor(by_factor)
            stats = by_factor.get(best) if best is not None else None
            lr, bs = None, None
            if best is not None:
                best_runs = by_batch[b][best]
                lr = best_runs[0].spec.lr
                vals = [
                    x.b_simple
                    for x in best_runs
                    if x.status == REACHED and x.b_simple is not None and math.isfinite(x.b_simple)
                ]
                bs = statistics.median(vals) if vals else None
            points.append(
                BatchPoint(
                    opt, b, by_factor, [f for f in core if f in by_factor] or core, best, lr, stats, bs
                )
            )
        if window and points and points[-1].best is not None:
            points[-1].window = window_factors(points[-1].best, spacing, window)
        meds = [p.stats.median if p.stats is not None else math.inf for p in points]
        for p, s in zip(points, local_slopes([p.batch for p in points], meds), strict=False):
            p.slope = s
        fit, notes = None, []
        ok = [(p.batch, p.stats.median) for p in points if p.stats is not None and p.stats.ok]
        if len(ok) >= 2:
            fit = fit_critical_batch([b for b, _ in ok], [s for _, s in ok])
            if fit.at_bound == "upper":
                notes.append("no knee inside the measured range: B_crit is only a lower bound")
            elif fit.at_bound == "lower":
                notes.append("plateau throughout: B_crit is only an upper bound")
        missing = [p.batch for p in points if p.stats is None or not p.stats.ok]
        if missing:
            notes.append(f"target not reached at batch {', '.join(map(str, missing))}")
        eff = scaling_efficiency([p.batch for p in points], meds)
        bvals = [p.b_simple for p in points if p.b_simple is not None]
        out.append(
            OptimizerSummary(opt, points, fit, eff, statistics.median(bvals) if bvals else None, notes)
        )
    return out
