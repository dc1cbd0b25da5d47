"""The training loop: config -> task data -> forward/backward -> sharded step -> schedule -> logs.

:class:`Trainer` owns the loop and its counters; features that hook into it are
:class:`dist_opt.extensions.Extension` objects, which see the trainer only through
:class:`dist_opt.extensions.TrainerView`. The data of step ``t`` comes from the task's
:meth:`~dist_opt.tasks.base.Task.train_batches` iterator, fed with this rank's micro-batch index
tensors of the :class:`~dist_opt.data.sampler.GlobalBatchSampler`, one batch per micro-step.

How a run ends is an exception (:class:`NonFiniteStorm`, :class:`StopRun`) whose ``exit_code`` is
what ``dist-opt train`` exits with; the command line's policy is in :mod:`dist_opt.train`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from dist_opt.config import Config, ConfigError, dump_yaml
from dist_opt.data.sampler import GlobalBatchSampler
from dist_opt.engine.buffers import BufferSync, convert_sync_batchnorm
from dist_opt.engine.precision import autocast, cast_params
from dist_opt.evaluation import evaluate
from dist_opt.noise_probe import micro_probe, noise_metrics
from dist_opt.outcome import EXIT_FAIL, EXIT_OK, NonFiniteStorm, StopRun, Summary

if TYPE_CHECKING:
    from dist_opt.extensions import Extension
    from dist_opt.tasks.base import Batch, Task

__all__ = [
    "NonFiniteStorm",
    "StopRun",
    "Summary",
    "Trainer",
    "build_extensions",
]  # the outcome names: re-exported


def build_extensions(cfg: Config) -> list[Extension]:
    """Extensions in call order: SWA before checkpoint (a checkpoint holds the updated average)."""
    from dist_opt.checkpoint.extension import CheckpointExtension
    from dist_opt.faults import PreemptionExtension

    exts: list[Extension] = [PreemptionExtension(cfg)]  # first: signals and peer watch cover the rest
    if cfg.swa.enabled:
        from dist_opt.swa import SWAExtension

        exts.append(SWAExtension(cfg))
    exts.append(CheckpointExtension(cfg))
    return exts


class Trainer:
    """One run: the loop of config -> data -> forward/backward -> sharded step -> logs.

    ``task``: a :class:`~dist_opt.tasks.base.Task` to train instead of the built-in one that
    ``cfg.task`` names (the Python entry :func:`dist_opt.api.fit` passes users' tasks here).
    """

    def __init__(self, cfg: Config, device: torch.device, task: Task | None = None):
        from dist_opt.engine.build import build_engine
        from dist_opt.noise_scale import NoiseScale
        from dist_opt.schedules import build_schedule, scaled_lr
        from dist_opt.tasks import build_task, configure_loader

        self.cfg, self.device = cfg, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.accum = cfg.accumulation_steps(self.world)
        self.micro = cfg.data.micro_batch
        self.run_dir = Path(cfg.run.out_dir)
        torch.manual_seed(cfg.run.seed * 1000 + self.rank)
        self.task = task if task is not None else build_task(cfg.task, cfg.run.seed)
        configure_loader(self.task, cfg.data, cfg.run.seed)  # DataLoader settings and run seed, where used
        self.model = cast_params(self.task.build_model().to(device), cfg.precision)
        if cfg.model.sync_batchnorm:
            try:
                self.model = convert_sync_batchnorm(self.model, device)
            except ValueError as e:
                raise ConfigError([str(e)]) from None
        self.sampler = GlobalBatchSampler(self.task.train_size, cfg.data.global_batch, cfg.run.seed)
        spe = self.sampler.steps_per_epoch
        if cfg.train.steps is not None:
            self.total_steps = cfg.train.steps
        elif spe is None:
            raise ConfigError(["train.epochs: the task is an unlimited stream; set train.steps"])
        elif cfg.train.epochs is None:  # the schema already refuses a config with neither
            raise ConfigError(["train: set train.steps or train.epochs"])
        else:
            self.total_steps = cfg.train.epochs * spe
        track = cfg.tracking.noise_scale and self.world > 1
        self.model, self.opt = build_engine(
            cfg, self.model, scaled_lr(cfg, cfg.data.global_batch), track_local_grad_norm=track
        )
        self.schedule = build_schedule(cfg, self.opt, spe, self.total_steps)
        self.buffer_sync = BufferSync(self.model) if cfg.model.broadcast_buffers and self.world > 1 else None
        self.probe = micro_probe(cfg, self.model, self.world, self.accum)  # B_simple on one rank
        self.noise = NoiseScale(cfg.tracking.noise_scale_ema) if track or self.probe else None
        self.step = 0  # optimizer steps done (applied or skipped)
        self.samples = 0
        self.consecutive_skips = 0
        self.tracker: Any = None
        self.run_id: str | None = None  # tracking run id (a resumed run continues it)
        self.resumed_from_step: int | None = None
        self.stop_requested = False  # set locally (request_stop, e.g. from a signal handler)
        self.stop_reason = ""
        self.stop_agreed = False  # some rank requested a stop before this step's all-reduce
        self._batches: Iterator[Batch] | None = None  # the task's batches from step _batches_at on
        self._batches_at: int | None = None
        self.extensions = build_extensions(cfg)

    # -- state and requests (what extensions may call) ------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The loop's own counters (JSON); a checkpoint stores them under ``trainer``."""
        return {
            "step": self.step,
            "samples": self.samples,
            "consecutive_skips": self.consecutive_skips,
            "run_id": self.run_id,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` output: the next step is ``state["step"]``."""
        self.step = int(state["step"])
        self.samples = int(state["samples"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.run_id = state["run_id"]
        self.resumed_from_step = self.step
        self._batches = None  # the data stream restarts at the resumed step

    def request_stop(self, reason: str) -> None:
        """Ask the ranks to stop after the current step (safe in a signal handler: only sets flags).
        The first reason wins; every rank stops after the same step (agreed in the step's all-reduce)."""
        if not self.stop_requested:
            self.stop_requested, self.stop_reason = True, reason

    # -- run directory and tracking ------------------------------------------------------------
    def _open_run_dir(self) -> None:
        from dist_opt.run_dir import open_problem, run_dir_problem
        from dist_opt.tracking import Tracker

        verdict: list[str | None] = [None]
        if self.rank == 0:  # rank 0 owns the folder; every rank learns its verdict (no rank waits alone)
            verdict[0] = run_dir_problem(self.run_dir)
            try:
                if verdict[0] is None:
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                    (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg), encoding="utf-8")
            except OSError as e:
                verdict[0] = open_problem(self.run_dir, e)
        if self.world > 1:
            dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise ConfigError([verdict[0]])
        self.tracker = Tracker(
            self.cfg, self.run_dir, self.rank, run_id=self.run_id, resume_step=self.resumed_from_step
        )
        if self.rank == 0:
            self.run_id = self.tracker.run_id
        holder = [self.run_id]
        dist.broadcast_object_list(holder, src=0)
        self.run_id = holder[0]

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> Summary:
        for ext in self.extensions:
            ext.setup(self)
        self._open_run_dir()
        cfg = self.cfg
        bar = None
        if self.rank == 0 and cfg.train.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True, file=sys.stderr
            )
        t_start = time.perf_counter()
        train_time = 0.0
        samples_start = self.samples
        loss = float("nan")
        summary = None
        eval_metrics: dict[str, float] = {}
        try:
            if self.step >= self.total_steps and self.resumed_from_step is not None:
                # resumed a finished run (e.g. the quickstart run twice): report it, change nothing
                held_out = self.evaluate() if self.task.eval_size > 0 else {}
                summary = Summary(
                    steps=self.step, samples=self.samples, skipped=self.opt.skipped_steps, eval=held_out,
                    run_dir=str(self.run_dir.resolve()),
                )  # fmt: skip
                self._finish(summary, first_end=False)  # the weights again; the run's summary stays
                return summary
            while self.step < self.total_steps:
                try:
                    metrics = self.train_step()
                except NonFiniteStorm as e:
                    for ext in self.extensions:
                        ext.on_stop(self, str(e))
                    raise
                train_time += metrics["time/step_ms"] / 1e3
                loss = metrics["loss"]
                for ext in self.extensions:
                    ext.after_step(self, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{loss:.4f}",
                        lr=f"{metrics['lr']:.3g}",
                        sps=f"{metrics['samples_per_s']:.0f}",
                        refresh=False,
                    )
                if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                    self.tracker.log(metrics, step=self.step)
                if self.sampler.is_epoch_end(self.step - 1):
                    self.schedule.epoch_end()
                    for ext in self.extensions:
                        ext.after_epoch(self, self.sampler.epoch_of(self.step - 1))
                if (
                    cfg.train.eval_every
                    and self.step % cfg.train.eval_every == 0
                    and self.step < self.total_steps
                    and self.task.eval_size > 0
                ):
                    eval_metrics = self.evaluate_and_log()
                    self.schedule.on_eval(eval_metrics["eval/loss"])
                for ext in self.extensions:  # the step's boundary work is done: the exact-resume point
                    ext.step_end(self)
                if self.stop_agreed:
                    for ext in self.extensions:
                        ext.on_stop(self, self.stop_reason)
                    raise StopRun(self.stop_reason)
            eval_metrics = self.evaluate_and_log()
            for ext in self.extensions:
                ext.finish(self)
            wall = time.perf_counter() - t_start
            summary = Summary(
                steps=self.step,
                samples=self.samples,
                skipped=self.opt.skipped_steps,
                train_loss=loss,
                eval=eval_metrics,
                samples_per_s=(self.samples - samples_start) / max(train_time, 1e-9),
                wall_s=wall,
                run_dir=str(self.run_dir.resolve()),
            )
            self._finish(summary)
            return summary
        finally:
            if bar is not None:
                bar.close()
            if self.tracker is not None:
                # W&B marks the run failed unless it ended normally (exit code as the CLI reports it)
                err = sys.exc_info()[1]
                code = (
                    EXIT_OK
                    if err is None
                    else err.exit_code
                    if isinstance(err, StopRun | NonFiniteStorm)
                    else EXIT_FAIL
                )
                self.tracker.close(code)
            if summary is not None and self.rank == 0:
                print(
                    "\n".join(["dist-opt summary:"] + ["  " + line for line in summary.lines()]), flush=True
                )

    # -- one step -------------------------------------------------------------------------------
    def _index_batches(self, start: int) -> Iterator[torch.Tensor]:
        """This rank's micro-batch indices: step ``start``'s k = 0..accum-1, then the next step's, ..."""
        for t in itertools.count(start):
            indices = self.sampler.global_indices(t)
            for k in range(self.accum):
                yield GlobalBatchSampler.split(indices, self.rank, self.world, self.micro, k)

    def _next_batches(self) -> Iterator[Batch]:
        """The task's batch iterator positioned at ``self.step`` (rebuilt when the step was moved)."""
        if self._batches is None or self._batches_at != self.step:
            self._batches = iter(self.task.train_batches(self._index_batches(self.step)))
        self._batches_at = None  # until this step has pulled all of its micro-batches
        return self._batches

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        batches = self._next_batches()
        # summed on the device (no host sync per micro-step); 0 + x is exact, so this is float(loss) summed
        loss_acc = torch.zeros((), dtype=torch.float64, device=self.device)
        scale = float(getattr(self.opt, "loss_scale", 1.0))  # fp16 loss scaling (precision.loss_scale)
        self.model.train()
        for k in range(self.accum):
            batch = next(batches)
            ctx = self.opt.no_sync() if k < self.accum - 1 else contextlib.nullcontext()
            with ctx:
                with autocast(self.cfg.precision, self.device):
                    loss = self.task.loss(self.model, batch)
                (loss * scale if scale != 1.0 else loss).backward()
            if self.probe is not None:
                self.probe.after_micro_step()
            loss_acc += loss.detach().double()
        t1 = time.perf_counter()
        lr = self.opt.param_groups[0]["lr"]
        applied = self.opt.step()
        self.opt.zero_grad()
        if self.buffer_sync is not None and not self.buffer_sync.empty:
            self.buffer_sync.sync()  # rank 0's BatchNorm statistics everywhere (model.broadcast_buffers)
        # a signal may set stop_requested at any moment: the loop acts only on the agreed value
        extra = torch.tensor([float(self.accum), float(self.stop_requested)], dtype=torch.float64)
        loss_sum = torch.cat([loss_acc.reshape(1), extra.to(self.device)])
        dist.all_reduce(loss_sum)  # mean loss over the global batch, and: does any rank want to stop?
        loss_sum = loss_sum.cpu()  # the step's one host sync for the loss
        self.stop_agreed = bool(loss_sum[2] > 0)
        if self.stop_agreed:
            self.request_stop("stop requested by another rank")
        self.step += 1
        self._batches_at = self.step
        self.samples += self.cfg.data.global_batch
        if applied:
            self.consecutive_skips = 0
            self.schedule.step()
        else:
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.cfg.train.max_consecutive_skips:
                raise NonFiniteStorm(
                    f"{self.consecutive_skips} consecutive steps had a non-finite gradient "
                    f"(train.max_consecutive_skips); stopping at step {self.step}"
                )
        dt = time.perf_counter() - t0
        return self._step_metrics(float(loss_sum[0] / loss_sum[1]), lr, applied, dt, t1 - t0)

    def _step_metrics(
        self, loss: float, lr: float, applied: bool, dt: float, fwd_bwd: float
    ) -> dict[str, Any]:
        st = self.opt.last_stats
        gb = self.cfg.data.global_batch
        metrics: dict[str, Any] = {
            "loss": loss,
            "lr": lr,
            "grad_norm": st.get("grad_norm"),
            "skipped": int(not applied),
            "skipped_total": self.opt.skipped_steps,
            "samples": self.samples,
            "samples_per_s": gb / dt,
            "tokens_per_s": gb * self.task.tokens_per_sample / dt,
            "time/step_ms": 1e3 * dt,
            "time/forward_backward_ms": 1e3 * fwd_bwd,
        }
        for k, v in st.items():
            if k.startswith(("time/", "trust_ratio/", "shampoo/")) and isinstance(v, int | float | str):
                metrics[k] = v
        for k in ("clip_coef", "loss_scale"):  # loss_scale: precision.compute fp16
            if k in st:
                metrics[k] = st[k]
        metrics.update(noise_metrics(self.noise, st, self.probe, self.micro, gb, applied))
        return metrics

    # -- evaluation and the end of the run --------------------------------------------------------
    def evaluate_and_log(self) -> dict[str, float]:
        """Evaluate, let the extensions add to it, log it; nothing when the task has no held-out data."""
        if self.task.eval_size == 0:
            return {}
        metrics = self.evaluate()
        for ext in self.extensions:
            ext.after_eval(self, metrics)
        self.tracker.log(metrics, step=self.step)
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Held-out loss (and accuracy) of the model as it is now, over all ranks (collective)."""
        with autocast(self.cfg.precision, self.device):
            return evaluate(self.task, self.model, self.rank, self.world, self.cfg.train.eval_max_samples)

    def _finish(self, summary: Summary, first_end: bool = True) -> None:
        from dist_opt.integrations import full_state_dict

        params = full_state_dict(self.model)  # a collective under fsdp2: every rank calls it
        if self.rank != 0:
            return
        torch.save(params, self.run_dir / "final_params.pt")
        if not first_end and (self.run_dir / "summary.json").exists():
            return
        record = {
            "steps": summary.steps,
            "samples": summary.samples,
            "skipped": summary.skipped,
            "train_loss": summary.train_loss,
            **summary.eval,
            "samples_per_s": summary.samples_per_s,
            "wall_s": summary.wall_s,
            "world_size": self.world,
        }
        self.tracker.summary(record)
        (self.run_dir / "summary.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
