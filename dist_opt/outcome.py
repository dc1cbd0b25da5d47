"""How a run ends: its exit codes, the exceptions that end it early, and the :class:`Summary` it returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_STOPPED = 0, 1, 2, 3, 4


class NonFiniteStorm(RuntimeError):
    """Too many consecutive steps had a non-finite gradient (``train.max_consecutive_skips``)."""

    exit_code = EXIT_NONFINITE


class StopRun(RuntimeError):
    """The ranks agreed to stop early (e.g. preemption); state was saved by the extensions."""

    exit_code = EXIT_STOPPED


@dataclass
class Summary:
    """What a finished run reports (every rank has it; the evaluation is all-reduced)."""

    steps: int = 0
    samples: int = 0
    skipped: int = 0
    train_loss: float = float("nan")
    eval: dict[str, float] = field(default_factory=dict)
    samples_per_s: float = 0.0
    wall_s: float = 0.0
    run_dir: str = ""

    def lines(self) -> list[str]:
        out = [
            f"steps {self.steps} ({self.skipped} skipped), samples {self.samples}, "
            f"wall {self.wall_s:.1f}s, {self.samples_per_s:.0f} samples/s (training steps)",
            f"final train loss {self.train_loss:.4f}"
            if not math.isnan(self.train_loss)
            else "final train loss: none (no step ran in this session)",
        ]
        if self.eval:
            out.append(
                "final " + ", ".join(f"{k} {v:.4f}" for k, v in self.eval.items() if isinstance(v, float))
            )
        out.append(f"run directory {self.run_dir}")
        return out
