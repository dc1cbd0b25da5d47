"""The training entry point: ``python -m dist_opt.train CONFIG [dotted.key=value ...]``.

Under torchrun / deepspeed / mpirun / srun every process joins the group described by its
launcher's environment. With no launcher and ``distributed.nproc > 1`` it starts the ranks
itself through torchrun's Python API (standalone rendezvous on a free port).

Exit codes: 0 done, 1 failure, 2 bad input (config, launcher environment), 3 stopped because
of too many consecutive non-finite steps, 4 stopped early on request (preemption signal) after
saving a checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist_opt.config import Config, ConfigError, dump_yaml, load_config
from dist_opt.data.sampler import GlobalBatchSampler
from dist_opt.dist.env import LaunchEnvError, detect
from dist_opt.dist.group import destroy_process_group, init_process_group

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_NONFINITE = 0, 1, 2, 3
EVAL_BATCH = 256


class NonFiniteStorm(RuntimeError):
    pass


class StopRun(RuntimeError):
    """The ranks agreed to stop early (e.g. preemption); state was saved by the extensions."""


EXIT_STOPPED = 4


def build_extensions(cfg: Config) -> list:
    """Extensions in call order: SWA before checkpoint (a checkpoint holds the updated average)."""
    import importlib.util

    from dist_opt.faults import PreemptionExtension

    exts: list = [PreemptionExtension(cfg)]  # first: signals and peer watch cover everything after it
    # (the modules land independently; until one exists its feature is simply absent)
    if cfg.swa.enabled and importlib.util.find_spec("dist_opt.swa") is not None:
        from dist_opt.swa import SWAExtension

        exts.append(SWAExtension(cfg))
    if importlib.util.find_spec("dist_opt.checkpoint") is not None:
        from dist_opt.checkpoint.extension import CheckpointExtension

        exts.append(CheckpointExtension(cfg))
    return exts


class _ArgParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2 instead of a usage dump
        raise ConfigError([f"dist-opt train: {message} (usage: dist-opt train CONFIG [key=value ...])"])


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = _ArgParser(prog="dist-opt train", description="Train a dist-opt config.", allow_abbrev=False)
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(list(argv))


def validate_for_world(cfg: Config, world: int) -> None:
    from dist_opt.integrations import check_engine
    from dist_opt.tasks import check_task  # imports a task given by import path: fails before ranks start

    problems = cfg.check_world(world) + check_engine(cfg, world) + check_task(cfg.task)
    if problems:
        raise ConfigError(problems)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return EXIT_OK
        env = detect(os.environ)
        world = env.world_size if env.is_launched else cfg.distributed.nproc
        validate_for_world(cfg, world)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_BAD_INPUT
    except LaunchEnvError as e:
        print(f"launch error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not env.is_launched and cfg.distributed.nproc > 1:
        return spawn_local(args.config, args.overrides, cfg.distributed.nproc, cfg.train.preemption_signals)
    return run(cfg, env)


def spawn_local(config: str, overrides: Sequence[str], nproc: int, signals: Sequence[str] = ()) -> int:
    """Start ``nproc`` ranks on this machine with torchrun's Python API (standalone, free port).

    Signals to this process (SIGTERM, SIGINT, ``train.preemption_signals``) are forwarded to the
    ranks by torchrun; the ranks stop, save and exit 4, which is then this process's exit code.
    """
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args as torchrun_args
    from torch.distributed.run import run as torchrun

    from dist_opt.faults import ENV_EXIT_STATUS_DIR, read_exit_statuses, signal_by_name

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ.setdefault("LOGLEVEL", "WARNING")
    forward = ["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"]
    forward += [s for s in (signal_by_name(n).name for n in signals) if s not in forward]
    targs = torchrun_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
                           f"--signals-to-handle={','.join(forward)}",
                           "--module", "dist_opt.train", config, *overrides])
    with tempfile.TemporaryDirectory(prefix="dist-opt-exit-") as status_dir:
        os.environ[ENV_EXIT_STATUS_DIR] = status_dir
        try:
            torchrun(targs)
        except ChildFailedError as e:
            # a rank killed by torchrun after it had finished (its code is recorded) counts with that code
            codes = {rank: f.exitcode for rank, f in e.failures.items()} | read_exit_statuses(status_dir)
            if set(codes.values()) in ({EXIT_NONFINITE}, {EXIT_STOPPED}):
                return next(iter(codes.values()))
            print(f"dist-opt: rank(s) failed with exit codes {dict(sorted(codes.items()))}", file=sys.stderr)
            return next(iter(codes.values()), EXIT_FAIL) if len(set(codes.values())) == 1 else EXIT_FAIL
        except SignalException as e:  # torchrun forwarded the signal and waited for the ranks
            codes = read_exit_statuses(status_dir)
            if len(codes) == nproc and set(codes.values()) == {EXIT_STOPPED}:
                return EXIT_STOPPED
            print(f"dist-opt: {e.sigval.name}: ranks ended with exit codes {codes or 'unknown'}",
                  file=sys.stderr)
            return 128 + int(e.sigval)
        finally:
            os.environ.pop(ENV_EXIT_STATUS_DIR, None)
    return EXIT_OK


@dataclass
class Summary:
    steps: int = 0
    samples: int = 0
    skipped: int = 0
    train_loss: float = float("nan")
    eval: dict[str, float] = field(default_factory=dict)
    samples_per_s: float = 0.0
    wall_s: float = 0.0
    run_dir: str = ""

    def lines(self) -> list[str]:
        out = [f"steps {self.steps} ({self.skipped} skipped), samples {self.samples}, "
               f"wall {self.wall_s:.1f}s, {self.samples_per_s:.0f} samples/s (training steps)",
               f"final train loss {self.train_loss:.4f}"]
        if self.eval:
            out.append("final " + ", ".join(f"{k} {v:.4f}" for k, v in self.eval.items()
                                            if isinstance(v, float)))
        out.append(f"run directory {self.run_dir}")
        return out


def run(cfg: Config, env: Any) -> int:
    """Train in the group described by ``env``; returns the exit code (see the module docstring)."""
    from dist_opt import faults

    device = init_process_group(env, cfg.distributed.backend, cfg.distributed.timeout_s)
    try:
        code = _fit(cfg, device, env.rank)
        # recorded before teardown: the launcher may kill this rank once another one has exited
        return faults.record_exit_status(env.rank, code)
    finally:
        faults.release()
        destroy_process_group()


def _fit(cfg: Config, device: torch.device, rank: int) -> int:
    from dist_opt.diagnose import explain

    try:
        Trainer(cfg, device).fit()
    except NonFiniteStorm as e:
        if rank == 0:
            print(f"dist-opt: {e} (lower optimizer.lr or set optimizer.max_grad_norm; resume=latest continues "
                  "from the last checkpoint)", file=sys.stderr)
        return EXIT_NONFINITE
    except StopRun as e:
        if rank == 0:
            print(f"dist-opt: stopped early ({e}); resume with resume=latest", file=sys.stderr)
        return EXIT_STOPPED
    except ConfigError as e:
        if rank == 0:
            print(e, file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"dist-opt: rank {rank}: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:  # a failed collective or write (DCP raises BaseException): one clear line
        line = explain(e, rank, cfg.run.out_dir)
        if line is None:
            raise
        print(line, file=sys.stderr, flush=True)
        return EXIT_FAIL
    return EXIT_OK


class Trainer:
    """One run: the loop of config -> data -> forward/backward -> sharded step -> logs."""

    def __init__(self, cfg: Config, device: torch.device):
        from dist_opt.engine.build import build_engine
        from dist_opt.noise_scale import NoiseScale
        from dist_opt.schedules import build_schedule, scaled_lr
        from dist_opt.tasks import build_task

        self.cfg, self.device = cfg, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.accum = cfg.accumulation_steps(self.world)
        self.micro = cfg.data.micro_batch
        self.run_dir = Path(cfg.run.out_dir)
        torch.manual_seed(cfg.run.seed * 1000 + self.rank)
        self.task = build_task(cfg.task, cfg.run.seed)
        self.model = self.task.build_model().to(device)
        self.sampler = GlobalBatchSampler(self.task.train_size, cfg.data.global_batch, cfg.run.seed)
        spe = self.sampler.steps_per_epoch
        if cfg.train.steps is not None:
            self.total_steps = cfg.train.steps
        elif spe is None:
            raise ConfigError(["train.epochs: the task is an unlimited stream; set train.steps"])
        else:
            self.total_steps = cfg.train.epochs * spe
        track = cfg.tracking.noise_scale and self.world > 1
        self.model, self.opt = build_engine(cfg, self.model, scaled_lr(cfg, cfg.data.global_batch),
                                            track_local_grad_norm=track)
        self.schedule = build_schedule(cfg, self.opt, spe, self.total_steps)
        self.noise = NoiseScale(cfg.tracking.noise_scale_ema) if track else None
        self.step = 0  # optimizer steps done (applied or skipped)
        self.samples = 0
        self.consecutive_skips = 0
        self.tracker = None
        self.run_id: str | None = None  # tracking run id (a resumed run continues it)
        self.resumed_from_step: int | None = None
        self.stop_requested = False  # set locally (e.g. by a signal handler); ranks agree each step
        self.stop_reason = ""
        self.stop_agreed = False  # some rank requested a stop before this step's all-reduce
        self.extensions = build_extensions(cfg)

    # -- run directory and tracking ------------------------------------------------------------
    def _open_run_dir(self) -> None:
        from dist_opt.tracking import Tracker

        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg), encoding="utf-8")
        self.tracker = Tracker(self.cfg, self.run_dir, self.rank, run_id=self.run_id,
                               resume_step=self.resumed_from_step)
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

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                       file=sys.stderr, smoothing=0.1)
        t_start = time.perf_counter()
        train_time = 0.0
        samples_start = self.samples
        loss = float("nan")
        summary = None
        eval_metrics: dict[str, float] = {}
        try:
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
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['lr']:.3g}",
                                    sps=f"{metrics['samples_per_s']:.0f}", refresh=False)
                if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                    self.tracker.log(metrics, step=self.step)
                if self.sampler.is_epoch_end(self.step - 1):
                    self.schedule.epoch_end()
                    for ext in self.extensions:
                        ext.after_epoch(self, self.sampler.epoch_of(self.step - 1))
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < self.total_steps:
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
            summary = Summary(steps=self.step, samples=self.samples, skipped=self.opt.skipped_steps,
                              train_loss=loss, eval=eval_metrics,
                              samples_per_s=(self.samples - samples_start) / max(train_time, 1e-9), wall_s=wall,
                              run_dir=str(self.run_dir.resolve()))
            self._finish(summary)
            return summary
        finally:
            if bar is not None:
                bar.close()
            if self.tracker is not None:
                # W&B marks the run failed unless it ended normally (exit code as the CLI reports it)
                err = sys.exc_info()[1]
                code = 0 if err is None else EXIT_STOPPED if isinstance(err, StopRun) else \
                    EXIT_NONFINITE if isinstance(err, NonFiniteStorm) else EXIT_FAIL
                self.tracker.close(code)
            if summary is not None and self.rank == 0:
                print("\n".join(["dist-opt summary:"] + ["  " + line for line in summary.lines()]), flush=True)

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        indices = self.sampler.global_indices(self.step)
        loss_sum = torch.zeros(2, dtype=torch.float64)
        self.model.train()
        for k in range(self.accum):
            idx = GlobalBatchSampler.split(indices, self.rank, self.world, self.micro, k)
            batch = self.task.train_batch(idx)
            ctx = self.opt.no_sync() if k < self.accum - 1 else contextlib.nullcontext()
            with ctx:
                loss = self.task.loss(self.model, batch)
                loss.backward()
            loss_sum[0] += float(loss.detach())
            loss_sum[1] += 1
        t1 = time.perf_counter()
        lr = self.opt.param_groups[0]["lr"]
        applied = self.opt.step()
        self.opt.zero_grad()
        # a signal may set stop_requested at any moment: the loop acts only on the agreed value
        loss_sum = torch.cat([loss_sum, torch.tensor([float(self.stop_requested)], dtype=torch.float64)])
        dist.all_reduce(loss_sum)  # mean loss over the global batch, and: does any rank want to stop?
        self.stop_agreed = bool(loss_sum[2] > 0)
        if self.stop_agreed and not self.stop_requested:
            self.stop_requested, self.stop_reason = True, "stop requested by another rank"
        self.step += 1
        self.samples += self.cfg.data.global_batch
        if applied:
            self.consecutive_skips = 0
            self.schedule.step()
        else:
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.cfg.train.max_consecutive_skips:
                raise NonFiniteStorm(f"{self.consecutive_skips} consecutive steps had a non-finite gradient "
                                     f"(train.max_consecutive_skips); stopping at step {self.step}")
        dt = time.perf_counter() - t0
        st = self.opt.last_stats
        metrics: dict[str, Any] = {
            "loss": float(loss_sum[0] / loss_sum[1]), "lr": lr, "grad_norm": st.get("grad_norm"),
            "skipped": int(not applied), "skipped_total": self.opt.skipped_steps,
            "samples": self.samples, "samples_per_s": self.cfg.data.global_batch / dt,
            "tokens_per_s": self.cfg.data.global_batch * self.task.tokens_per_sample / dt,
            "time/step_ms": 1e3 * dt, "time/forward_backward_ms": 1e3 * (t1 - t0),
        }
        for k, v in st.items():
            if k.startswith(("time/", "trust_ratio/", "shampoo/")) and isinstance(v, int | float | str):
                metrics[k] = v
        if "clip_coef" in st:
            metrics["clip_coef"] = st["clip_coef"]
        if self.noise is not None and "local_grad_sq" in st and applied:
            b_small = self.micro * st["local_micro_steps"]
            if b_small < self.cfg.data.global_batch:
                self.noise.update(st["local_grad_sq"], st["global_grad_sq"], b_small, self.cfg.data.global_batch)
                if self.noise.b_simple is not None:
                    metrics["noise/b_simple"] = self.noise.b_simple
        return metrics

    def evaluate_and_log(self) -> dict[str, float]:
        metrics = self.evaluate()
        for ext in self.extensions:
            ext.after_eval(self, metrics)
        self.tracker.log(metrics, step=self.step)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        n = self.task.eval_size
        if self.cfg.train.eval_max_samples is not None:
            n = min(n, self.cfg.train.eval_max_samples)
        mine = torch.arange(self.rank, n, self.world)
        sums = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
        for lo in range(0, len(mine), EVAL_BATCH):
            out = self.task.eval_sums(self.model, self.task.eval_batch(mine[lo:lo + EVAL_BATCH]))
            for k in sums:
                sums[k] += out.get(k, 0.0)
        vec = torch.tensor([sums["loss_sum"], sums["count"], sums["correct"]], dtype=torch.float64)
        dist.all_reduce(vec)
        res = {"eval/loss": float(vec[0] / vec[1])}
        if self.task.has_accuracy:
            res["eval/accuracy"] = float(vec[2] / vec[1])
        return res

    def _finish(self, summary: Summary) -> None:
        from dist_opt.integrations import full_state_dict

        params = full_state_dict(self.model)  # a collective under fsdp2: every rank calls it
        if self.rank != 0:
            return
        torch.save(params, self.run_dir / "final_params.pt")
        record = {"steps": summary.steps, "samples": summary.samples, "skipped": summary.skipped,
                  "train_loss": summary.train_loss, **summary.eval, "samples_per_s": summary.samples_per_s,
                  "wall_s": summary.wall_s, "world_size": self.world}
        self.tracker.summary(record)
        (self.run_dir / "summary.json").write_text(json.dumps(record, indent=1), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
