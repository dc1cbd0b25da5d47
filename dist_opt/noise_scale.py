"""Gradient noise scale B_simple (McCandlish et al. 2018, App. A.1), pure math.

Data parallelism gives two gradient estimates per step for free: each rank's local gradient over
``b_small`` samples (before reduction) and the reduced gradient over ``b_big`` samples. With
``E|G_B|^2 = |G|^2 + tr(Sigma)/B`` both unknowns follow from the two squared norms::

    |G|^2_est    = (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
    tr(Sigma)_est = (|G_small|^2 - |G_big|^2) / (1/b_small - 1/b_big)
    B_simple     = EMA(tr(Sigma)_est) / EMA(|G|^2_est)      (ratio of EMAs, not EMA of ratios)

Both single-step estimates are unbiased; their ratio is not, hence the EMAs of each. The EMAs are
bias-corrected (``ema_t / (1 - ema^t)``), so the first estimate is the first update's value.
"""

from __future__ import annotations

import math


class NoiseScale:
    """EMA estimator of ``tr(Sigma)``, ``|G|^2`` and ``B_simple = tr(Sigma) / |G|^2``.

    ``ema`` in [0, 1): weight of the past (0: last step only).
    """

    def __init__(self, ema: float):
        if not (0.0 <= ema < 1.0):
            raise ValueError(f"ema={ema!r}: expected 0 <= ema < 1")
        self.ema = float(ema)
        self._trace = 0.0  # EMA accumulators (not bias-corrected)
        self._g2 = 0.0
        self._weight = 0.0  # 1 - ema**t, the bias correction
        self.updates = 0

    @staticmethod
    def estimates(
        local_sq_norm_mean: float, global_sq_norm: float, b_small: int, b_big: int
    ) -> tuple[float, float]:
        """One step's unbiased ``(tr(Sigma)_est, |G|^2_est)``."""
        if b_small < 1 or b_big < 1:
            raise ValueError(f"batch sizes must be >= 1, got b_small={b_small}, b_big={b_big}")
        if b_big == b_small:
            raise ValueError(
                f"b_big == b_small == {b_small}: the noise scale needs two different batch sizes "
                "(world size > 1)"
            )
        if b_big < b_small:
            raise ValueError(f"b_big={b_big} < b_small={b_small}: b_big is the global (reduced) batch")
        trace = (local_sq_norm_mean - global_sq_norm) / (1.0 / b_small - 1.0 / b_big)
        g2 = (b_big * global_sq_norm - b_small * local_sq_norm_mean) / (b_big - b_small)
        return trace, g2

    def update(self, local_sq_norm_mean: float, global_sq_norm: float, b_small: int, b_big: int) -> bool:
        """Fold in one step: ``local_sq_norm_mean`` = mean over ranks of ``|G_small|^2``, ``global_sq_norm``
        = ``|G_big|^2``. Non-finite inputs (a skipped step) change nothing and return False."""
        trace, g2 = self.estimates(local_sq_norm_mean, global_sq_norm, b_small, b_big)
        if not (math.isfinite(trace) and math.isfinite(g2)):
            return False
        a = 1.0 - self.ema
        self._trace = self.ema * self._trace + a * trace
        self._g2 = self.ema * self._g2 + a * g2
        self._weight = self.ema * self._weight + a
        self.updates += 1
        return True

    @property
    def trace_sigma(self) -> float | None:
        """EMA estimate of ``tr(Sigma)`` (per-sample gradient covariance trace); None before any update."""
        return self._trace / self._weight if self.updates else None

    @property
    def g2(self) -> float | None:
        """EMA estimate of ``|G|^2`` (true gradient squared norm); None before any update."""
        return self._g2 / self._weight if self.updates else None

    @property
    def b_simple(self) -> float | None:
        """``EMA(tr Sigma) / EMA(|G|^2)``; None before any update, NaN while ``EMA(|G|^2) <= 0``
        (noise dominates the estimate, the ratio is undefined)."""
        if not self.updates:
            return None
        return self._trace / self._g2 if self._g2 > 0 else math.nan

    def metrics(self, prefix: str = "noise_scale/") -> dict[str, float]:
        """``{prefix+"b_simple", prefix+"trace_sigma", prefix+"g2"}`` for logging; empty before any update."""
        b_simple, trace_sigma, g2 = self.b_simple, self.trace_sigma, self.g2
        if b_simple is None or trace_sigma is None or g2 is None:  # no update yet
            return {}
        return {
            f"{prefix}b_simple": b_simple,
            f"{prefix}trace_sigma": trace_sigma,
            f"{prefix}g2": g2,
        }

    def state_dict(self) -> dict[str, float | int]:
        return {
            "ema": self.ema,
            "trace": self._trace,
            "g2": self._g2,
            "weight": self._weight,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the accumulators; ``self.ema`` stays the constructor's (the current config wins)."""
        missing = {"trace", "g2", "weight", "updates"} - set(state)
        if missing:
            raise KeyError(f"NoiseScale state is missing {sorted(missing)}")
        self._trace = float(state["trace"])
        self._g2 = float(state["g2"])
        self._weight = float(state["weight"])
        self.updates = int(state["updates"])


def relative_steps(batch: float, base_batch: float, b_noise: float) -> float:
    """Predicted ``S(B) / S(B0)`` from ``S(B) = S_min (1 + B_noise / B)`` (McCandlish et al. 2018, eq. 2.11).

    ``batch`` = B, ``base_batch`` = B0 (the batch the noise scale was measured at), ``b_noise`` =
    the critical batch estimate (B_simple). All must be positive and finite.
    """
    for name, v in (("batch", batch), ("base_batch", base_batch), ("b_noise", b_noise)):
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name}={v!r}: expected a positive finite number")
    return (1.0 + b_noise / batch) / (1.0 + b_noise / base_batch)
