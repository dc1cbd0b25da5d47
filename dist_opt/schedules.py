"""Learning-rate schedules: a batch-size scale rule, a linear warmup, one main schedule.

The lr of param group ``i`` at optimizer step ``t`` (1-based) is::

    base_i = scaled_lr(cfg, data.global_batch) * group.get("lr_mult", 1.0)
    lr_i(t) = warmup(t) * main_i(t)

- **Scale rule** (Goyal et al. 2017): ``linear`` multiplies ``optimizer.lr`` by
  ``B / schedule.reference_batch``, ``sqrt`` by its square root, ``none`` leaves it.
- **Warmup**: for ``t <= W = schedule.warmup_steps`` the factor is
  ``s + (1 - s) * (t - 1) / W`` with ``s = schedule.warmup_start_factor`` (the
  ``torch.optim.lr_scheduler.LinearLR`` formula, so step 1 uses ``s * base`` and step ``W + 1``
  the full base). It is computed in closed form because ``LinearLR`` rejects ``s = 0``, the
  default here (and MLPerf's: ``lr = base * global_step / W``).
- **Main schedule clocks.** Step-clocked schedules (cosine, cosine_restarts, polynomial, and
  step/multistep with ``schedule.per_step``) start their clock *after* the warmup: step ``W + k``
  uses their value for their k-th step, and they sit at their first value (the base lr) during
  warmup -- as MLPerf's LARS poly decay, which counts from the warmup end. So cosine and
  polynomial decay over ``total_steps - W`` steps, and ``per_step`` milestones count steps after
  warmup. Epoch-clocked step/multistep count whole epochs of the run (as Goyal et al.'s
  milestones at epochs 30/60/80 with a 5-epoch warmup); should an epoch end during warmup, the
  warmup factor multiplies the decayed lr. Plateau reacts to evaluations only once the warmup is
  over (evaluations during warmup are ignored).
- **Noam** already contains its warmup: ``lr = base * d^-0.5 * min(t^-0.5, t * W^-1.5)`` with
  ``W = schedule.warmup_steps`` and ``d = schedule.d_model``, on the run's own clock; no linear
  warmup is added and ``warmup_start_factor`` is unused. With ``d_model`` unset the d factor is 1,
  so the peak lr (at ``t = W``) is ``base / sqrt(W)``: ``optimizer.lr`` is then the Noam scale
  factor, not the peak lr. ``W = 0`` gives plain ``base * t^-0.5``.
- ``schedule.min_lr`` is an absolute floor shared by all param groups (as torch's ``eta_min`` /
  ``min_lr``), not scaled by ``lr_mult``.

**One owner of the lr.** :class:`LRSchedule` is the only writer of ``param_groups[i]["lr"]``. A
feature that changes the lr (SWA's annealing, :mod:`dist_opt.swa`) composes with it through
:meth:`LRSchedule.set_override`: a function from the schedule's lrs to the lrs to use, applied
every time the schedule writes them. The schedule keeps its own clock and state underneath
(:attr:`LRSchedule.lrs` is always its own value); :meth:`LRSchedule.refresh` rewrites the lrs when
what the override depends on has changed.

Values come from ``torch.optim.lr_scheduler`` (StepLR, MultiStepLR, ReduceLROnPlateau,
CosineAnnealingLR, CosineAnnealingWarmRestarts, LambdaLR for Noam and for polynomial decay to
``min_lr``, which PolynomialLR lacks). Each torch scheduler drives a private "shadow" optimizer
holding one lr per real param group, and the warmup factor is applied on top when the real
group's lr is written; SequentialLR/ChainedScheduler are not used because torch's chainable
formulas read back ``group["lr"]`` and would compound the warmup factor, and neither can mix a
step-clocked warmup with an epoch- or eval-clocked decay.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import lr_scheduler as tls

from dist_opt.config.loader import ConfigError
from dist_opt.config.schema import Config

STATE_VERSION = 1


def scaled_lr(cfg: Config, global_batch: int) -> float:
    """``optimizer.lr`` scaled for ``global_batch`` by ``schedule.scale_rule`` vs ``schedule.reference_batch``."""
    ratio = global_batch / cfg.schedule.reference_batch
    rule = cfg.schedule.scale_rule
    if rule == "linear":
        return cfg.optimizer.lr * ratio
    if rule == "sqrt":
        return cfg.optimizer.lr * math.sqrt(ratio)
    return cfg.optimizer.lr


def warmup_factor(steps_done: int, warmup_steps: int, start_factor: float) -> float:
    """Warmup multiplier of step ``steps_done + 1``: linear from ``start_factor`` to 1 over ``warmup_steps``."""
    if steps_done >= warmup_steps:
        return 1.0
    return start_factor + (1.0 - start_factor) * steps_done / warmup_steps


def noam_factor(t: int, warmup_steps: int, d_model: int | None) -> float:
    """Noam multiplier at 1-based step ``t``: ``d^-0.5 * min(t^-0.5, t * W^-1.5)`` (d factor 1 if unset)."""
    scale = 1.0 if d_model is None else d_model**-0.5
    decay = t**-0.5
    if warmup_steps > 0:
        decay = min(decay, t * warmup_steps**-1.5)
    return scale * decay


def polynomial_value(base: float, end: float, k: int, horizon: int, power: float) -> float:
    """Polynomial decay from ``base`` (k = 0) to ``end`` (k >= horizon) with ``power``."""
    frac = 1.0 - min(k, horizon) / horizon
    return end + (base - end) * frac**power


def _set_lr(group: dict, value: float) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


LROverride = Callable[[list[float]], list[float]]
"""The schedule's lrs (one per param group) -> the lrs to write instead (same length)."""


class LRSchedule:
    """Drives the lr of every param group of one optimizer; see the module docstring for the math.

    Call :meth:`step` after every optimizer step, :meth:`epoch_end` at every epoch end and
    :meth:`on_eval` with every evaluation loss; each writes the lr the next step uses (through the
    override, if one is set: :meth:`set_override`).
    """

    def __init__(
        self,
        name: str,
        optimizer: torch.optim.Optimizer,
        shadow: torch.optim.Optimizer,
        main: tls.LRScheduler | None,
        clock: str,
        horizon: int | None,
        warmup_steps: int,
        start_factor: float,
    ) -> None:
        self.name = name
        self.optimizer = optimizer
        self._shadow = shadow
        self._main = main
        self._clock = clock  # "none" | "step" | "epoch" | "eval"
        self._horizon = horizon
        self._warmup = warmup_steps
        self._start = start_factor
        self.steps_done = 0
        self.epochs_done = 0
        self._override: LROverride | None = None
        self._apply()

    # -- clocks ------------------------------------------------------------------------------
    def step(self) -> None:
        """Advance one optimizer step."""
        self.steps_done += 1
        if self._clock == "step" and self.steps_done > self._warmup:
            assert self._main is not None
            if self._horizon is None or self._main.last_epoch < self._horizon:
                self._main.step()
        self._apply()

    def epoch_end(self) -> None:
        """Advance one epoch (epoch-clocked step/multistep decay here)."""
        self.epochs_done += 1
        if self._clock == "epoch":
            assert self._main is not None
            self._main.step()
        self._apply()

    def on_eval(self, metric: float) -> None:
        """A new evaluation loss (lower is better); plateau counts it once warmup is over."""
        if self._clock == "eval" and self.steps_done >= self._warmup:
            assert isinstance(self._main, tls.ReduceLROnPlateau)
            self._main.step(float(metric))
            self._apply()

    # -- values ------------------------------------------------------------------------------
    @property
    def lrs(self) -> list[float]:
        """The lr of each param group for the next optimizer step."""
        f = warmup_factor(self.steps_done, self._warmup, self._start)
        return [f * float(g["lr"]) for g in self._shadow.param_groups]

    def set_override(self, fn: LROverride | None) -> None:
        """Write ``fn(self.lrs)`` instead of :attr:`lrs` from now on (None: the schedule's own lrs again),
        starting with the lrs of the next step (written now)."""
        self._override = fn
        self._apply()

    def refresh(self) -> None:
        """Rewrite the lrs of the next step (the override's inputs changed)."""
        self._apply()

    def _apply(self) -> None:
        lrs = self.lrs
        if self._override is not None:
            lrs = self._override(lrs)
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            _set_lr(group, lr)

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state; a schedule built from the same config and loaded continues identically."""
        main = None
        if self._main is not None:
            main = copy.deepcopy(self._main.state_dict())
            if isinstance(main.get("milestones"), Counter):
                main["milestones"] = dict(main["milestones"])
        return {
            "version": STATE_VERSION,
            "name": self.name,
            "warmup_steps": self._warmup,
            "steps_done": self.steps_done,
            "epochs_done": self.epochs_done,
            "shadow_lrs": [float(g["lr"]) for g in self._shadow.param_groups],
            "main": main,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output and rewrite the optimizer's lrs."""
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"schedule state: unsupported version {sd.get('version')!r}")
        for key, mine in (("name", self.name), ("warmup_steps", self._warmup)):
            if sd[key] != mine:
                raise ValueError(
                    f"schedule state: saved with schedule.{key}={sd[key]!r}, config has {mine!r}"
                )
        if len(sd["shadow_lrs"]) != len(self._shadow.param_groups):
            raise ValueError(
                f"schedule state: saved for {len(sd['shadow_lrs'])} param groups, "
                f"optimizer has {len(self._shadow.param_groups)}"
            )
        self.steps_done = int(sd["steps_done"])
        self.epochs_done = int(sd["epochs_done"])
        for group, lr in zip(self._shadow.param_groups, sd["shadow_lrs"], strict=True):
            group["lr"] = float(lr)
        if self._main is not None:
            main = copy.deepcopy(sd["main"])
            if isinstance(self._main, tls.MultiStepLR):
                main["milestones"] = Counter(main["milestones"])
            self._main.load_state_dict(main)
        self._apply()


def _shadow_optimizer(bases: list[float]) -> torch.optim.Optimizer:
    from dist_opt.optim.light import ShadowOptimizer

    return ShadowOptimizer(bases)


def _main_scheduler(
    cfg: Config, shadow: torch.optim.Optimizer, bases: list[float], total_steps: int
) -> tuple[tls.LRScheduler | None, str, int | None]:
    """(torch scheduler on the shadow optimizer, its clock, horizon at which its clock stops)."""
    s = cfg.schedule
    decay_steps = max(1, total_steps - s.warmup_steps)
    per_step_or_epoch = "step" if s.per_step else "epoch"
    if s.name == "constant":
        return None, "none", None
    if s.name == "step":
        return tls.StepLR(shadow, step_size=s.step_size, gamma=s.gamma), per_step_or_epoch, None
    if s.name == "multistep":
        return tls.MultiStepLR(shadow, milestones=list(s.milestones), gamma=s.gamma), per_step_or_epoch, None
    if s.name == "plateau":
        sched = tls.ReduceLROnPlateau(
            shadow,
            mode="min",
            factor=s.gamma,
            patience=s.patience,
            threshold=s.threshold,
            threshold_mode="rel",
            min_lr=s.min_lr,
        )
        return sched, "eval", None
    if s.name == "noam":
        warmup, d_model = s.warmup_steps, s.d_model
        return tls.LambdaLR(shadow, lambda k: noam_factor(k + 1, warmup, d_model)), "step", None
    if s.name == "cosine":
        return tls.CosineAnnealingLR(shadow, T_max=decay_steps, eta_min=s.min_lr), "step", decay_steps
    if s.name == "cosine_restarts":
        return (
            tls.CosineAnnealingWarmRestarts(shadow, T_0=s.T_0, T_mult=s.T_mult, eta_min=s.min_lr),
            "step",
            None,
        )
    if s.name == "polynomial":

        def factor(base: float) -> Callable[[int], float]:
            return lambda k: polynomial_value(base, s.min_lr, k, decay_steps, s.power) / base

        return tls.LambdaLR(shadow, [factor(b) for b in bases]), "step", None
    raise ConfigError([f"schedule.name: unknown schedule {s.name!r}"])


def _check(cfg: Config, base: float, steps_per_epoch: int | None, total_steps: int) -> None:
    s = cfg.schedule
    problems = []
    if total_steps < 1:
        problems.append(f"train: the run has {total_steps} optimizer steps; need at least 1")
    if s.name in ("step", "multistep") and not s.per_step and steps_per_epoch is None:
        problems.append(
            f"schedule.per_step: schedule.name={s.name} counts epochs but this run has no epochs "
            "(unlimited stream); set schedule.per_step=true"
        )
    if s.name == "multistep" and not s.milestones:
        problems.append("schedule.milestones: multistep needs at least one milestone")
    if s.name == "plateau" and s.gamma >= 1:
        problems.append(f"schedule.gamma: plateau reduces lr by gamma, must be < 1 (got {s.gamma})")
    if s.name in ("cosine", "cosine_restarts", "polynomial", "plateau") and s.min_lr > base:
        problems.append(f"schedule.min_lr: {s.min_lr} exceeds the (scaled) base lr {base}")
    if problems:
        raise ConfigError(problems)


def build_schedule(
    cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int | None, total_steps: int
) -> LRSchedule:
    """Set every group's base lr (scaled lr x ``lr_mult``) and return the schedule driving them.

    Raises :class:`ConfigError` (one line per problem, naming the key) for unusable settings.
    """
    base = scaled_lr(cfg, cfg.data.global_batch)
    _check(cfg, base, steps_per_epoch, total_steps)
    bases = [base * float(g.get("lr_mult", 1.0)) for g in optimizer.param_groups]
    for group, b in zip(optimizer.param_groups, bases, strict=True):
        _set_lr(group, b)
        group["initial_lr"] = b
    shadow = _shadow_optimizer(bases)
    main, clock, horizon = _main_scheduler(cfg, shadow, bases, total_steps)
    # torch warns when a scheduler steps an optimizer that never stepped; the shadow never does.
    shadow._opt_called = True  # type: ignore[attr-defined]
    s = cfg.schedule
    warmup = 0 if s.name == "noam" else s.warmup_steps
    return LRSchedule(s.name, optimizer, shadow, main, clock, horizon, warmup, s.warmup_start_factor)


def lr_trace(
    cfg: Config,
    steps_per_epoch: int | None,
    total_steps: int,
    eval_every: int = 0,
    eval_metric: Callable[[int], float] | None = None,
) -> list[float]:
    """The lr of group 0 used at each step 1..total_steps, on a dummy optimizer.

    After step ``t``: ``step()``; then ``on_eval(eval_metric(t))`` if ``eval_every`` divides ``t``
    and a metric is given; then ``epoch_end()`` if ``steps_per_epoch`` divides ``t``.
    """
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optimizer.lr)
    sched = build_schedule(cfg, dummy, steps_per_epoch, total_steps)
    out = []
    for t in range(1, total_steps + 1):
        out.append(float(dummy.param_groups[0]["lr"]))
        sched.step()
        if eval_every and eval_metric is not None and t % eval_every == 0:
            sched.on_eval(eval_metric(t))
        if steps_per_epoch and t % steps_per_epoch == 0:
            sched.epoch_end()
    return out
