"""Extension points of the training loop, and what an extension may see of the trainer.

Features that hook into the loop (checkpointing, SWA, preemption handling) each live in their
own module as an :class:`Extension`; the Trainer calls them in list order at fixed points, and
everything they need to resume is in their ``state_dict``. The Trainer owns the loop; an
extension never calls another one directly.

An extension sees the trainer as a :class:`TrainerView`: attributes it may read, and the calls
through which it may act on the run (:meth:`TrainerView.request_stop`, the trainer's own
``state_dict``/``load_state_dict`` for a checkpoint, :meth:`TrainerView.evaluate`). It never sets
the trainer's attributes; the learning rate belongs to ``trainer.schedule`` (an extension that
changes it composes with the schedule through ``schedule.set_override``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dist_opt.config import Config
    from dist_opt.data.sampler import GlobalBatchSampler
    from dist_opt.noise_scale import NoiseScale
    from dist_opt.schedules import LRSchedule
    from dist_opt.tasks.base import Task
    from dist_opt.tracking import Tracker


class TrainerView(Protocol):
    """What an :class:`Extension` may read from and call on the trainer. Extensions only read these
    attributes; the trainer's state changes through the methods below."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    run_dir: Path
    model: nn.Module
    opt: Any  # the engine's optimizer (ShardedOptimizer or an integration's adapter)
    task: Task
    sampler: GlobalBatchSampler
    schedule: LRSchedule
    noise: NoiseScale | None
    tracker: Tracker | None  # open from after ``setup`` until the run ends
    extensions: list[Extension]
    step: int  # optimizer steps done (applied or skipped); inside ``after_step`` it counts that step
    total_steps: int
    samples: int
    run_id: str | None
    resumed_from_step: int | None
    stop_requested: bool

    def request_stop(self, reason: str) -> None:
        """Stop after the current step (all ranks agree on it; safe from a signal handler)."""

    def state_dict(self) -> dict[str, Any]:
        """The trainer's own counters (step, samples, ...) as JSON."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` output (a checkpoint resume, in ``setup``)."""

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the model as it is now (collective: every rank calls it)."""


class Extension:
    name = "extension"

    def setup(self, trainer: TrainerView) -> None:
        """After model/optimizer/schedule are built, before the run directory and tracker open
        (a checkpoint resume happens here, through ``trainer.load_state_dict``)."""

    def after_step(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        """After every optimizer step (``trainer.step`` already counts it); may add metrics."""

    def after_epoch(self, trainer: TrainerView, epoch: int) -> None:
        """After the last step of 0-based ``epoch`` (finite datasets only)."""

    def step_end(self, trainer: TrainerView) -> None:
        """After everything of a step (epoch end, eval, schedule updates): the point where the whole
        state is consistent, e.g. to save a checkpoint."""

    def after_eval(self, trainer: TrainerView, metrics: dict[str, float]) -> None:
        """After an evaluation of the live weights; may add metrics (e.g. SWA eval)."""

    def on_stop(self, trainer: TrainerView, reason: str) -> None:
        """The run stops early (preemption signal, non-finite storm) at a step boundary."""

    def finish(self, trainer: TrainerView) -> None:
        """After the last step and the final evaluation."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
