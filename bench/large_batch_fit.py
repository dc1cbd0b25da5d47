"""Pure helpers of the large-batch study: evaluation schedule, steps-to-target, seed statistics,
the McCandlish et al. (2018) fit ``S = S_min (1 + B_crit / B)`` and scaling efficiency.

No torch, no I/O: everything here is plain floats and lists, tested against known answers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

INF = math.inf


# -- evaluation schedule and steps-to-target ----------------------------------------------------
def eval_due(step: int, dense_until: int = 100, resolution: float = 0.01) -> bool:
    """Evaluate at every step up to ``dense_until``, then every ``ceil(step * resolution)`` steps.

    So a reported steps-to-target is at most ``resolution`` (1%) above the true first crossing.
    """
    if step <= dense_until:
        return True
    return step % math.ceil(step * resolution) == 0


def first_crossing(steps: Sequence[int], values: Sequence[float], target: float) -> int | None:
    """The first step whose value is <= ``target`` (None if none is)."""
    for s, v in zip(steps, values, strict=True):
        if v <= target:
            return int(s)
    return None


def stalled(curve: Sequence[tuple[int, float]]) -> bool:
    """True when no evaluation in the second half of the run (steps > last/2) beat the best loss of
    the first half: the loss sits on a floor (noise or lr too large) instead of decreasing."""
    if len(curve) < 3:
        return False
    half = curve[-1][0] / 2
    first = min((v for s, v in curve if s <= half), default=math.inf)
    second = min((v for s, v in curve if s > half), default=math.inf)
    return not second < first


# -- seeds and the learning-rate grid -----------------------------------------------------------
@dataclass(frozen=True)
class SeedStats:
    median: float
    """Median steps over seeds; a seed that did not reach the target counts as +inf."""
    low: float
    high: float
    reached: int
    total: int

    @property
    def ok(self) -> bool:
        return math.isfinite(self.median)


def seed_stats(steps: Sequence[int | None]) -> SeedStats:
    """Median and range of steps-to-target over seeds (None = not reached = +inf)."""
    if not steps:
        raise ValueError("seed_stats: no runs")
    vals = sorted(INF if s is None else float(s) for s in steps)
    n = len(vals)
    mid = vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])
    return SeedStats(mid, vals[0], vals[-1], sum(math.isfinite(v) for v in vals), n)


def grid_factors(points: int, spacing: float) -> list[float]:
    """``points`` lr multipliers, geometric with ratio ``spacing``, centred on 1 (odd ``points``)
    or with 1 as the lower middle point (even)."""
    if points < 1 or spacing <= 1:
        raise ValueError(f"grid: need points >= 1 and spacing > 1, got {points}, {spacing}")
    lo = -((points - 1) // 2)
    return [spacing**k for k in range(lo, lo + points)]


def best_factor(by_factor: Mapping[float, SeedStats]) -> float | None:
    """The lr factor with the smallest median steps; ties: smaller worst seed, then closer to 1.
    None if no factor reached the target on the median."""
    ok = [(st.median, st.high, abs(math.log(f)), f) for f, st in by_factor.items() if st.ok]
    return min(ok)[3] if ok else None


def edge_extension(by_factor: Mapping[float, SeedStats], spacing: float) -> float | None:
    """If the best factor sits at an edge of the grid run so far, the next factor beyond that edge
    (the grid is extended until the optimum is bracketed); None when it is bracketed. With no
    factor reaching the target, extend downwards (too large an lr is the common failure at
    large batch; too small an lr fails at the step cap with the loss still falling)."""
    if not by_factor:
        return None
    fs = sorted(by_factor)
    best = best_factor(by_factor)
    if best is None:
        return fs[0] / spacing
    if best == fs[-1]:
        return fs[-1] * spacing
    if best == fs[0]:
        return fs[0] / spacing
    return None


# -- the critical-batch fit ---------------------------------------------------------------------
@dataclass(frozen=True)
class CriticalFit:
    """``S(B) = s_min (1 + b_crit / B)``; equivalently ``E(B) = e_min (1 + B / b_crit)``."""

    s_min: float
    b_crit: float
    rms_log: float
    """Root-mean-square residual of log(steps)."""
    n: int
    at_bound: str = ""
    """'upper' if b_crit ran into the upper search bound (no knee seen: a lower bound only),
    'lower' if into the lower bound (plateau throughout: an upper bound only), else ''."""

    @property
    def e_min(self) -> float:
        """Minimum examples to target, ``s_min * b_crit``."""
        return self.s_min * self.b_crit

    def steps(self, batch: float) -> float:
        return self.s_min * (1.0 + self.b_crit / batch)


def _profile(log_b: Sequence[float], log_s: Sequence[float], log_bc: float) -> tuple[float, float]:
    """(sum of squared log residuals, log s_min) at fixed log b_crit (log s_min in closed form)."""
    bc = math.exp(log_bc)
    shape = [math.log1p(bc / math.exp(lb)) for lb in log_b]
    log_smin = sum(s - h for s, h in zip(log_s, shape, strict=True)) / len(log_s)
    sse = sum((s - log_smin - h) ** 2 for s, h in zip(log_s, shape, strict=True))
    return sse, log_smin


def fit_critical_batch(batches: Sequence[float], steps: Sequence[float], span: float = 1e3) -> CriticalFit:
    """Least-squares fit of ``log S = log s_min + log(1 + b_crit / B)`` (relative errors, as the
    measurements' noise is roughly proportional to S). ``b_crit`` is searched in
    ``[min(B) / span, max(B) * span]``: a coarse log grid, then golden-section refinement;
    ``s_min`` is optimal in closed form for each ``b_crit``."""
    pts = [
        (float(b), float(s))
        for b, s in zip(batches, steps, strict=True)
        if s is not None and math.isfinite(s)
    ]
    if len(pts) < 2:
        raise ValueError(f"fit_critical_batch: need at least 2 finite points, got {len(pts)}")
    if any(b <= 0 or s <= 0 for b, s in pts):
        raise ValueError("fit_critical_batch: batches and steps must be positive")
    log_b = [math.log(b) for b, _ in pts]
    log_s = [math.log(s) for _, s in pts]
    lo, hi = min(log_b) - math.log(span), max(log_b) + math.log(span)
    grid = [lo + (hi - lo) * i / 400 for i in range(401)]
    sse = [_profile(log_b, log_s, x)[0] for x in grid]
    i = min(range(len(grid)), key=sse.__getitem__)
    a, c = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    phi = (math.sqrt(5) - 1) / 2
    x1, x2 = c - phi * (c - a), a + phi * (c - a)
    f1, f2 = _profile(log_b, log_s, x1)[0], _profile(log_b, log_s, x2)[0]
    for _ in range(80):
        if f1 < f2:
            c, x2, f2 = x2, x1, f1
            x1 = c - phi * (c - a)
            f1 = _profile(log_b, log_s, x1)[0]
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + phi * (c - a)
            f2 = _profile(log_b, log_s, x2)[0]
    x = (a + c) / 2
    best_sse, log_smin = _profile(log_b, log_s, x)
    bound = "upper" if i == len(grid) - 1 else "lower" if i == 0 else ""
    return CriticalFit(math.exp(log_smin), math.exp(x), math.sqrt(best_sse / len(pts)), len(pts), bound)


# -- shape of the curve -------------------------------------------------------------------------
def local_slopes(batches: Sequence[float], steps: Sequence[float]) -> list[float | None]:
    """d log S / d log B between consecutive batches (None where either end is not finite)."""
    out: list[float | None] = []
    for (b0, s0), (b1, s1) in zip(
        zip(batches, steps, strict=True), list(zip(batches, steps, strict=True))[1:], strict=False
    ):
        if s0 is None or s1 is None or not (math.isfinite(s0) and math.isfinite(s1)):
            out.append(None)
        else:
            out.append(math.log(s1 / s0) / math.log(b1 / b0))
    return out


def regime(slope: float | None, perfect: float = -0.8, plateau: float = -0.2) -> str:
    """Shallue et al.'s regimes by local slope: perfect scaling (slope <= -0.8), diminishing
    returns, plateau (slope >= -0.2)."""
    if slope is None:
        return "-"
    if slope <= perfect:
        return "perfect"
    if slope >= plateau:
        return "plateau"
    return "diminishing"


def scaling_efficiency(
    batches: Sequence[float], steps: Sequence[float], factor: float = 16.0
) -> float | None:
    """(S(B0) / S(factor * B0)) / factor with B0 the smallest batch: 1 = perfect scaling.

    S at ``factor * B0`` is the measured value, or log-log interpolated between the neighbouring
    measured batches; None when that batch lies outside the measured range or a needed point is
    missing."""
    pts = sorted(
        (float(b), float(s))
        for b, s in zip(batches, steps, strict=True)
        if s is not None and math.isfinite(s)
    )
    if not pts or pts[0][0] != min(float(b) for b in batches):
        return None
    b0, s0 = pts[0]
    want = b0 * factor
    for (bl, sl), (bh, sh) in zip(pts, pts[1:], strict=False):
        if bl <= want <= bh:
            t = math.log(want / bl) / math.log(bh / bl) if bh > bl else 0.0
            s = math.exp(math.log(sl) + t * math.log(sh / sl))
            return (s0 / s) / factor
    if len(pts) == 1 and want == b0:
        return 1.0
    return None
