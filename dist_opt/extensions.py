"""Extension points of the training loop.

Features that hook into the loop (checkpointing, SWA, preemption handling) each live in their
own module as an :class:`Extension`; the Trainer calls them in list order at fixed points, and
everything they need to resume is in their ``state_dict``. The Trainer owns the loop; an
extension never calls another one directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dist_opt.train import Trainer


class Extension:
    name = "extension"

    def setup(self, trainer: Trainer) -> None:
        """After model/optimizer/schedule are built, before the run directory and tracker open
        (a checkpoint resume happens here: it may set trainer.step, trainer.run_id, ...)."""

    def after_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """After every optimizer step (``trainer.step`` already counts it); may add metrics."""

    def after_epoch(self, trainer: Trainer, epoch: int) -> None:
        """After the last step of 0-based ``epoch`` (finite datasets only)."""

    def step_end(self, trainer: Trainer) -> None:
        """After everything of a step (epoch end, eval, schedule updates): the point where the whole
        state is consistent, e.g. to save a checkpoint."""

    def after_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After an evaluation of the live weights; may add metrics (e.g. SWA eval)."""

    def on_stop(self, trainer: Trainer, reason: str) -> None:
        """The run stops early (preemption signal, non-finite storm) at a step boundary."""

    def finish(self, trainer: Trainer) -> None:
        """After the last step and the final evaluation."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
