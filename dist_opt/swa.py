"""Stochastic weight averaging of the optimizer's shards, as a Trainer extension.

**Averaging.** From epoch ``swa.start_epoch`` (0-based) on, at the end of every
``swa.every_epochs``-th epoch, each rank folds the parameters it owns into its average, with no
communication: ``swa`` ``w_avg <- w_avg + (w - w_avg) / (n + 1)`` (= ``(n w_avg + w) / (n + 1)``,
``torch.optim.swa_utils.AveragedModel``'s update), ``ema`` ``w_avg <- d w_avg + (1 - d) w``
(``d = swa.ema_decay``, at the same epoch cadence); the first update copies ``w``. A rank owns
elements ``[r c, min((r + 1) c, numel))`` of every flattened parameter, ``c = ceil(numel / N)``
(the optimizer's ``owned_specs()``: exactly its shard under ZeRO-1/2, the same split of the
replicated parameters under ZeRO-0), so the average costs ~1/N of the parameters per rank. The
averaged weights are all-gathered (``opt.gather_params``) only to evaluate or to export.

**SWA learning rate** (``swa.lr`` set): ``torch.optim.swa_utils.SWALR`` created at the start of
epoch ``swa.start_epoch`` and stepped at every epoch end. The lr of every step of epoch
``swa.start_epoch + j`` is ``a swa_lr + (1 - a) lr0`` with ``a = f(min(1, j / anneal_epochs))``,
``f`` linear or ``(1 - cos(pi t)) / 2``, and ``a = 1`` from the start when ``anneal_epochs = 0``;
``lr0`` is the schedule's lr of the first step of that epoch (frozen; the schedule keeps its
clock underneath). The schedule stays the only writer of the lr: this is an override
(``LRSchedule.set_override``) that replaces its lrs once the next step is in an SWA epoch. Param
groups with an ``optimizer.lr_multipliers`` factor get ``swa.lr`` times that factor; ``swa.lr`` is
absolute (no batch-size scale rule).

**Evaluation.** The average is swapped into the model (all-gather), BatchNorm statistics are
recomputed (``swa.update_bn``), the held-out set is evaluated as for the live weights (keys
``swa/eval/loss``, ``swa/eval/accuracy``), and the live weights and buffers are put back. This
happens with every evaluation of the live weights and, once there is an average, at every
epoch end (both the live and the SWA weights are then evaluated and logged at that step).

**BatchNorm refresh** = ``torch.optim.swa_utils.update_bn`` over a fixed loader: the training
set in index order in batches of ``data.micro_batch`` (the batch size BatchNorm sees in
training; a last batch of a single sample is dropped). Every BatchNorm's statistics are reset
and cumulatively averaged (momentum ``None``), i.e. ``running_mean`` is the plain mean over
batches of the batch means and ``running_var`` that of the unbiased batch variances. In train
mode a batch's statistics depend only on that batch and the weights, never on the running
statistics, so the mean over batches decomposes: batch ``k`` goes to rank ``k mod N``, every rank
averages its batches, and one all-reduce of ``(k_r mean_r, k_r var_r, k_r)`` gives the mean over
all batches -- the single-process ``update_bn`` result (to float round-off), independent of the
world size for a given ``data.micro_batch``. (The *live* model's BatchNorm buffers are rank-local,
each rank having trained on its own micro-batches, so they differ between ranks and world sizes by
design.) The global RNG state is saved and restored around the pass (dropout would draw from it).

**Export.** At the end of the run ``<run.out_dir>/swa_model.pt``: the model's full ``state_dict``
with the averaged parameters and refreshed BatchNorm buffers (plain CPU tensors; load with
``torch.load(path, weights_only=True)`` into the model on one process).

**State.** ``state_dict()`` is world-size independent: per parameter name the full flattened
average (offset 0), gathered on every rank (a collective, like ``ShardedOptimizer.state_dict``);
``shard_state_dict()`` holds only this rank's valid piece and its global offset. ``load_state_dict``
accepts either, as long as the given piece covers this rank's range, so a checkpoint reshards.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dist_opt.config import Config, ConfigError
from dist_opt.engine.precision import autocast
from dist_opt.engine.state_codec import ShardSpec, gather_full, load_piece
from dist_opt.extensions import Extension

if TYPE_CHECKING:
    from dist_opt.dist.collectives import Comm
    from dist_opt.engine.core import PieceOptimizer
    from dist_opt.extensions import TrainerView
    from dist_opt.tasks.base import Task

STATE_VERSION = 1
LOW_PRECISION = (torch.bfloat16, torch.float16)
EXPORT_NAME = "swa_model.pt"


# -- SWALR ---------------------------------------------------------------------------------------
def anneal_alpha(t: float, strategy: str) -> float:
    """SWALR's interpolation weight at progress ``t`` in [0, 1]: linear or cosine."""
    if strategy == "linear":
        return t
    if strategy == "cos":
        return (1 - math.cos(math.pi * t)) / 2
    raise ValueError(f"swa.anneal_strategy: unknown strategy {strategy!r} (linear or cos)")


def swalr_lr(lr0: float, swa_lr: float, epochs_in: int, anneal_epochs: int, strategy: str) -> float:
    """The lr of ``torch.optim.swa_utils.SWALR`` after ``epochs_in`` scheduler steps, started from ``lr0``."""
    t = 1.0 if anneal_epochs == 0 else min(1.0, epochs_in / anneal_epochs)
    a = anneal_alpha(t, strategy)
    return swa_lr if a == 1 else swa_lr * a + lr0 * (1 - a)


# -- BatchNorm refresh ---------------------------------------------------------------------------
def bn_batches(train_size: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) of the BatchNorm-refresh batches: the training set in index order; a last batch
    of one sample is dropped (BatchNorm has no batch statistics for a single sample)."""
    spans = [(lo, min(lo + batch_size, train_size)) for lo in range(0, train_size, batch_size)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] == 1:
        spans.pop()
    return spans


def _running_stats(m: _BatchNorm) -> tuple[Tensor, Tensor, Tensor]:
    """Running mean, running variance and batch count of a BatchNorm that tracks running stats."""
    mean, var, count = m.running_mean, m.running_var, m.num_batches_tracked
    if mean is None or var is None or count is None:
        raise ValueError(f"{type(m).__name__} keeps no running statistics")
    return mean, var, count


@torch.no_grad()
def refresh_bn(model: nn.Module, task: Task, batch_size: int, comm: Comm) -> int:
    """``update_bn`` over :func:`bn_batches`, split round-robin over ranks and all-reduced.

    Returns the number of batches averaged (0 when the model has no BatchNorm with running stats).
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    if task.train_size is None:
        raise ValueError("BatchNorm refresh needs a finite training set")
    spans = bn_batches(task.train_size, batch_size)
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for lo, hi in spans[comm.rank :: comm.world]:
            task.loss(model, task.train_batch(torch.arange(lo, hi, dtype=torch.long)))
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        model.train(was_training)
    if comm.world == 1:
        return len(spans)
    mine = float(len(spans[comm.rank :: comm.world]))
    parts = []
    for m in bns:
        mean, var, _ = _running_stats(m)
        parts += [mean.double().reshape(-1) * mine, var.double().reshape(-1) * mine]
    vec = torch.cat([*parts, torch.tensor([mine], dtype=torch.float64, device=parts[0].device)])
    comm.all_reduce(vec)
    total = float(vec[-1])
    pos = 0
    for m in bns:
        mean, var, count = _running_stats(m)
        for buf in (mean, var):
            buf.copy_((vec[pos : pos + buf.numel()] / total).view_as(buf))
            pos += buf.numel()
        count.fill_(int(total))
    return int(total)


# -- the extension -------------------------------------------------------------------------------
class SWAExtension(Extension):
    """SWA / EMA of the optimizer shards: average at epoch ends, evaluate, export, checkpoint."""

    name = "swa"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.n = 0  # averages taken
        self.base_lrs: list[float] | None = None  # lr0 of SWALR per param group (once the SWA lr is active)
        self.specs: list[ShardSpec] = []  # this rank's piece of every parameter (opt.owned_specs())
        self.avg: Tensor | None = None  # this rank's pieces, back to back
        self._pieces: list[Tensor] = []  # views of ``avg``, one per spec
        self._trainer: TrainerView | None = None
        self._eval_cache: tuple[int, dict[str, float]] | None = None

    # -- hooks -----------------------------------------------------------------------------------
    def setup(self, trainer: TrainerView) -> None:
        s = self.cfg.swa
        spe = trainer.sampler.steps_per_epoch
        if spe is None:
            raise ConfigError(
                [
                    f"swa.enabled: SWA averages at epoch ends, but task {self.cfg.task.name!r} is an "
                    "unlimited stream without epochs"
                ]
            )
        epochs = trainer.total_steps // spe
        if s.start_epoch >= epochs:
            raise ConfigError(
                [
                    f"swa.start_epoch: {s.start_epoch} but the run completes only {epochs} epoch(s) "
                    f"({trainer.total_steps} steps of {spe}); nothing would be averaged"
                ]
            )
        opt = trainer.opt
        self._trainer = trainer
        self.specs = opt.owned_specs()
        live = opt.owned_params()
        # the average is fp32 whatever the working dtype (bf16 weights would round every update away)
        dtype = torch.float32 if any(p.dtype in LOW_PRECISION for p in live) else live[0].dtype
        self.avg = torch.zeros(sum(s.valid for s in self.specs), dtype=dtype, device=live[0].device)
        self._pieces = list(self.avg.split([s.valid for s in self.specs]))
        if s.lr is not None:
            trainer.schedule.set_override(self._lr_override)
            self._apply_lr(trainer)

    def after_epoch(self, trainer: TrainerView, epoch: int) -> None:
        s = self.cfg.swa
        if epoch >= s.start_epoch and (epoch - s.start_epoch) % s.every_epochs == 0:
            self.update(trainer.opt)
        self._apply_lr(trainer)
        if self.n >= 1 and not self._loop_evaluates(trainer):
            metrics = trainer.evaluate()
            self.after_eval(trainer, metrics)
            tracker = trainer.tracker
            if tracker is None:
                raise RuntimeError("swa: the trainer has no open tracker at an epoch end")
            tracker.log(metrics, step=trainer.step)

    def after_eval(self, trainer: TrainerView, metrics: dict[str, float]) -> None:
        if self.n == 0:
            return
        if self._eval_cache is None or self._eval_cache[0] != self.n:
            with self.swapped_in(trainer):
                res = trainer.evaluate()
            self._eval_cache = (self.n, {f"swa/{k}": v for k, v in res.items()})
        metrics.update(self._eval_cache[1])
        metrics["swa/n_averaged"] = self.n

    def finish(self, trainer: TrainerView) -> None:
        if self.n == 0:
            if trainer.rank == 0:
                print("dist-opt: swa: no epoch was averaged; swa_model.pt not written", file=sys.stderr)
            return
        self.export(trainer, Path(self.cfg.run.out_dir) / EXPORT_NAME)

    # -- averaging -------------------------------------------------------------------------------
    def _views(self, opt: PieceOptimizer) -> tuple[list[Tensor], list[Tensor]]:
        assert self.avg is not None, "SWAExtension.setup was not called"
        pairs = [
            (a, c) for s, a, c in zip(self.specs, self._pieces, opt.owned_params(), strict=True) if s.valid
        ]
        return [a for a, _ in pairs], [c if c.dtype == a.dtype else c.to(a.dtype) for a, c in pairs]

    @torch.no_grad()
    def update(self, opt: PieceOptimizer) -> None:
        """Fold the current parameters of this rank's pieces into the average (no communication)."""
        avg, cur = self._views(opt)
        if avg:
            if self.n == 0:
                torch._foreach_copy_(avg, cur)
            elif self.cfg.swa.kind == "ema":
                torch._foreach_lerp_(avg, cur, 1.0 - self.cfg.swa.ema_decay)
            else:
                torch._foreach_lerp_(avg, cur, 1.0 / (self.n + 1))
        self.n += 1
        self._eval_cache = None

    def gather_into(self, opt: PieceOptimizer) -> None:
        """All-gather the average into the optimizer's parameters (i.e. into the model)."""
        assert self.avg is not None, "SWAExtension.setup was not called"
        live = opt.owned_params()
        opt.gather_params(
            [a if a.dtype == c.dtype else a.to(c.dtype) for a, c in zip(self._pieces, live, strict=True)]
        )

    @contextlib.contextmanager
    def swapped_in(self, trainer: TrainerView) -> Iterator[None]:
        """Inside the block the model holds the averaged weights (BatchNorm refreshed: ``swa.update_bn``)."""
        opt, model = trainer.opt, trainer.model
        live = [(p, p.detach().clone()) for p in model.parameters()]
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        was_training = model.training
        try:
            self.gather_into(opt)
            if self.cfg.swa.update_bn:
                dev = trainer.device
                rng = torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else [])
                with rng, autocast(self.cfg.precision, dev):  # the forward as in training
                    refresh_bn(model, trainer.task, self.cfg.data.micro_batch, opt.comm)
            yield
        finally:
            with torch.no_grad():
                for t, saved in live + buffers:
                    t.copy_(saved)
            model.train(was_training)

    def averaged_model_state_dict(self, trainer: TrainerView) -> dict[str, Tensor]:
        """The model's ``state_dict`` with the averaged weights, as CPU tensors (collective: all ranks)."""
        with self.swapped_in(trainer):
            return {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}

    def export(self, trainer: TrainerView, path: Path) -> None:
        """Write :meth:`averaged_model_state_dict` to ``path`` on rank 0 (atomically; collective)."""
        sd = self.averaged_model_state_dict(trainer)
        if trainer.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(sd, tmp)
            os.replace(tmp, path)

    # -- learning rate ---------------------------------------------------------------------------
    def _swa_lrs(self, trainer: TrainerView, epoch: int) -> list[float] | None:
        s = self.cfg.swa
        if s.lr is None or epoch < s.start_epoch or self.base_lrs is None:
            return None
        mults = [float(g.get("lr_mult", 1.0)) for g in trainer.opt.param_groups]
        return [
            swalr_lr(b, s.lr * m, epoch - s.start_epoch, s.anneal_epochs, s.anneal_strategy)
            for b, m in zip(self.base_lrs, mults, strict=True)
        ]

    def _lr_override(self, lrs: list[float]) -> list[float]:
        """The schedule's lrs, or SWALR's once the next step (0-based ``trainer.step``) is in an SWA
        epoch and ``lr0`` is frozen (installed with ``schedule.set_override`` when ``swa.lr`` is set)."""
        t = self._trainer
        swa = None if t is None else self._swa_lrs(t, t.sampler.epoch_of(t.step))
        return lrs if swa is None else swa

    def _apply_lr(self, trainer: TrainerView) -> None:
        """Freeze ``lr0`` (the schedule's lrs) once the next step is in an SWA epoch; the schedule then
        writes the SWA lr of that step."""
        s = self.cfg.swa
        if s.lr is None:
            return
        if self.base_lrs is None and trainer.sampler.epoch_of(trainer.step) >= s.start_epoch:
            self.base_lrs = [float(x) for x in trainer.schedule.lrs]
        trainer.schedule.refresh()

    @staticmethod
    def _loop_evaluates(trainer: TrainerView) -> bool:
        """Whether the Trainer evaluates right after this step anyway (eval_every, or the final eval)."""
        every = trainer.cfg.train.eval_every
        return trainer.step >= trainer.total_steps or bool(every and trainer.step % every == 0)

    # -- state -----------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "kind": self.cfg.swa.kind,
            "n": self.n,
            "base_lrs": None if self.base_lrs is None else list(self.base_lrs),
            "numel": {s.name: s.numel for s in self.specs},
        }

    def shard_state_dict(self) -> dict[str, Any]:
        """This rank's average: per parameter name its valid piece, starting at ``offsets[name]``."""
        assert self.avg is not None, "SWAExtension.setup was not called"
        pieces = {s.name: p.clone() for s, p in zip(self.specs, self._pieces, strict=True)}
        return {**self._meta(), "averaged": pieces, "offsets": {s.name: s.offset for s in self.specs}}

    def state_dict(self) -> dict[str, Any]:
        """The full (world-size independent) average, gathered on every rank: call on all ranks."""
        assert self.avg is not None, "SWAExtension.setup was not called"
        assert self._trainer is not None
        full = gather_full(self._trainer.opt.comm, self.specs, self._pieces)
        return {
            **self._meta(),
            "averaged": {s.name: t for s, t in zip(self.specs, full, strict=True)},
            "offsets": {s.name: 0 for s in self.specs},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict` (full) or a :meth:`shard_state_dict` piece covering this rank's range."""
        assert self.avg is not None, "SWAExtension.setup must run before load_state_dict"
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"swa state: unsupported version {state.get('version')!r}")
        if state["kind"] != self.cfg.swa.kind:
            raise ValueError(
                f"swa state: saved with swa.kind={state['kind']!r}, config has {self.cfg.swa.kind!r}"
            )
        n = int(state["n"])
        averaged, offsets, numel = state["averaged"], state.get("offsets", {}), state.get("numel", {})
        new = torch.zeros_like(self.avg)
        if n > 0:
            for s, dst in zip(self.specs, new.split([s.valid for s in self.specs]), strict=True):
                if s.name not in averaged:
                    raise KeyError(f"swa state: no average for parameter {s.name!r}")
                if s.name in numel and int(numel[s.name]) != s.numel:
                    raise ValueError(
                        f"swa state: {s.name} has {numel[s.name]} elements, the model has {s.numel}"
                    )
                load_piece(dst, averaged[s.name], s, int(offsets.get(s.name, 0)), f"swa state: {s.name}")
        self.avg.copy_(new)
        self.n = n
        self.base_lrs = None if state.get("base_lrs") is None else [float(x) for x in state["base_lrs"]]
        self._eval_cache = None
        if self._trainer is not None:
            self._apply_lr(self._trainer)
