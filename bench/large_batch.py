"""Large-batch study: steps-to-target vs batch size, LR scaling, and the critical batch size.

    python -m bench.large_batch [--task synthetic|digits|stdlib_lm] [--optimizers sgd,momentum,...]
        [--batches 32,64,...,4096] [--seeds 5] [--budget-minutes 30] [--target LOSS]
    python -m bench.large_batch --preset lm|cnn     (networks: see bench/large_batch_network.py)

For every optimizer and global batch B it trains with a small lr grid around the scale rule's lr
(linear for the SGD family and LARS, square root for the Adam family and Shampoo, from a hand-tuned
lr at the reference batch) and several seeds, each run stopping as soon as the held-out loss
reaches the target. It reports the best steps-to-target (median and range over seeds), fits
``S = S_min (1 + B_crit / B)`` (McCandlish et al. 2018), compares B_crit with the gradient noise
scale B_simple measured at the target, and re-runs a few points through the real multi-rank CLI.
Output: a markdown report and a PNG plot (default ``bench/results/large_batch.md``/``.png``).
Runs are cached in ``--work-dir`` (``runs.jsonl``); ``--reuse`` skips runs already there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.large_batch_analysis import OptimizerSummary, factor_key, summarize, window_factors
from bench.large_batch_fit import edge_extension, grid_factors, seed_stats
from bench.large_batch_network import NETWORK_PRESETS, network_sections
from bench.large_batch_run import (
    CliResult,
    RunResult,
    RunSpec,
    load_cli_point,
    micro_for,
    run_cli_point,
    run_point,
)

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2

SCALE_RULES = {
    "sgd": "linear",
    "momentum": "linear",
    "nesterov": "linear",
    "lars": "linear",
    "adam": "sqrt",
    "adamw": "sqrt",
    "lamb": "sqrt",
    "shampoo": "sqrt",
    "adagrad": "sqrt",
    "rmsprop": "sqrt",
}
"""Goyal et al. (2017) linear rule for SGD/momentum (and LARS, You et al. 2017); the square-root rule
for Adam-type methods (You et al. 2019 for LAMB; Malladi et al. 2022 for Adam)."""

OPTIMIZER_OVERRIDES = {
    "lars": ("optimizer.trust_coefficient=1.0",),
    "shampoo": ("optimizer.precondition_frequency=1",),
}
"""LARS with eta = 1: the global lr is then the per-layer relative step (with the paper's eta = 1e-3
the lr of the excluded biases, which is not multiplied by eta, would have to be 1000x too large).
Shampoo recomputes its root inverses every step: large-batch runs reach the target in 20-50 steps, so
the default (every 20 steps) would leave the preconditioner stale for most of a run; this study counts
steps, not wall time."""


@dataclass(frozen=True)
class TaskPreset:
    overrides: tuple[str, ...]
    target: float
    batches: tuple[int, ...]
    reference_batch: int
    max_steps: int
    lrs: dict[str, float]
    """Base lr at ``reference_batch`` per optimizer (a coarse hand search at that batch)."""
    eval_samples: int = 4096
    about: str = ""
    task_name: str = ""
    """``task.name`` of the runs (empty: the preset's key)."""
    metric: str = "loss"
    """What the target bounds: ``loss`` (held-out loss) or ``error`` (1 - held-out accuracy)."""
    warmup_rule: str = "fixed"
    """``fixed``: ``--warmup-steps`` at every batch; ``sqrt``: ``--warmup-steps`` x sqrt(B / reference_batch)."""
    probe: bool = False
    """Log the trainer's online B_simple (``tracking.noise_scale``) at every batch: micro-batch <= B / 2, so
    one rank always accumulates >= 2 micro-batches (:mod:`dist_opt.noise_probe`)."""
    defaults: tuple[tuple[str, object], ...] = ()
    """Command-line defaults of this preset (``(dest, value)``; options given explicitly win)."""


PRESETS: dict[str, TaskPreset] = {
    "synthetic": TaskPreset(
        overrides=(
            "task.kind=regression",
            "task.condition_number=100",
            "task.noise=0.5",
            "task.eval_size=16384",
        ),
        eval_samples=16384,
        target=0.27,
        batches=(32, 64, 128, 256, 512, 1024, 2048, 4096),
        reference_batch=32,
        max_steps=3000,
        lrs={
            "sgd": 0.3,
            "momentum": 0.03,
            "nesterov": 0.03,
            "adamw": 0.03,
            "adam": 0.03,
            "lars": 0.003,
            "lamb": 0.01,
            "shampoo": 0.06,
        },
        about="noisy quadratic: linear regression on a rotated, ill-conditioned (condition number 100) "
        "Gaussian input with label noise 0.5 (Bayes loss 0.25); target 0.27 = Bayes + 2% of the initial "
        "excess loss; 16384 eval samples keep the eval set's own noise (about 0.25 x sqrt(2/n) = 0.003) "
        "well below the 0.02 excess",
    ),
    "digits": TaskPreset(
        overrides=(),
        target=0.15,
        batches=(16, 32, 64, 128, 256, 512, 1024),
        reference_batch=16,
        max_steps=3000,
        lrs={
            "sgd": 0.4,
            "momentum": 0.04,
            "nesterov": 0.04,
            "adamw": 0.006,
            "adam": 0.006,
            "lars": 0.003,
            "lamb": 0.009,
            "shampoo": 0.009,
        },
        about="MLP on scikit-learn's 8x8 digits (1437 training images: batches above that are impossible)",
    ),
    "stdlib_lm": TaskPreset(
        overrides=(),
        target=2.5,
        batches=(8, 16, 32, 64, 128, 256),
        reference_batch=8,
        max_steps=2000,
        eval_samples=256,
        lrs={
            "sgd": 0.3,
            "momentum": 0.03,
            "nesterov": 0.03,
            "adamw": 0.001,
            "adam": 0.001,
            "lars": 0.003,
            "lamb": 0.003,
            "shampoo": 0.001,
        },
        about="byte-level GPT on Python's stdlib source (slow on CPU: shrink --batches/--optimizers)",
    ),
}

PRESETS.update({k: TaskPreset(**v) for k, v in NETWORK_PRESETS.items()})

DEFAULT_OPTIMIZERS = "sgd,momentum,adamw,lars,lamb,shampoo"


# -- arguments ------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _pos_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _key_value(text: str) -> tuple[str, str]:
    key, sep, val = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key.strip(), val.strip()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.large_batch",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--task",
        choices=sorted(k for k in PRESETS if k not in NETWORK_PRESETS),
        default="synthetic",
        help="built-in task (default synthetic)",
    )
    p.add_argument(
        "--preset",
        choices=["quadratic", *NETWORK_PRESETS],
        default="quadratic",
        help="quadratic (default: --task decides), lm (byte-level GPT, AdamW vs LAMB) or cnn (ResNet with "
        "BatchNorm on digits, momentum vs LARS vs LAMB)",
    )
    p.add_argument(
        "--task-override",
        action="append",
        default=None,
        metavar="task.KEY=VALUE",
        help="replace the preset's task.* overrides (repeatable)",
    )
    p.add_argument(
        "--optimizers", default=DEFAULT_OPTIMIZERS, help=f"comma list (default {DEFAULT_OPTIMIZERS})"
    )
    p.add_argument(
        "--batches", type=_int_list, default=None, help="global batch sizes (default: the task preset)"
    )
    p.add_argument("--seeds", type=int, default=5, help="seeds per lr (default 5)")
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds are FIRST..FIRST+SEEDS-1 (default 0; to split a sweep)",
    )
    p.add_argument("--target", type=float, default=None, help="target eval loss (default: the task preset)")
    p.add_argument(
        "--budget-minutes",
        type=_pos_float,
        default=30.0,
        help="wall-clock budget; the sweep stops submitting runs after 90%% of it (default 30)",
    )
    p.add_argument(
        "--lr",
        action="append",
        type=_key_value,
        default=[],
        metavar="OPT=LR",
        help="base lr at the reference batch for an optimizer (repeatable)",
    )
    p.add_argument(
        "--scale-rule",
        action="append",
        type=_key_value,
        default=[],
        metavar="OPT=RULE",
        help="linear | sqrt | none for an optimizer (repeatable)",
    )
    p.add_argument(
        "--reference-batch", type=int, default=None, help="batch of the base lrs (default: preset)"
    )
    p.add_argument("--grid-points", type=int, default=5, help="core lr grid size (default 5)")
    p.add_argument("--grid-spacing", type=_pos_float, default=2.0, help="ratio between grid lrs (default 2)")
    p.add_argument(
        "--max-extend", type=int, default=6, help="extra lrs beyond a grid edge holding the best (6)"
    )
    p.add_argument(
        "--window",
        type=int,
        default=3,
        help="stable-lr window at the largest batch: best lr x spacing^k, |k| <= W (default 3; 0: off)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="step cap per run (default: preset)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear lr warmup steps (default 0)")
    p.add_argument("--eval-samples", type=int, default=None, help="eval set size (default: the task preset)")
    p.add_argument("--micro-batch", type=int, default=512, help="micro-batch cap; accumulation above (512)")
    p.add_argument(
        "--noise-batches",
        default="256,4096,8",
        help="B_simple measurement: b_small,b_big,draws, or 'none' (default 256,4096,8)",
    )
    p.add_argument(
        "--multirank-batches",
        default="largest",
        help="batches re-run per optimizer through the real 2-rank CLI: 'largest', a comma list, "
        "or 'none' (default largest)",
    )
    p.add_argument(
        "--multirank-optimizers",
        default="all",
        help="optimizers of the multi-rank check: 'all' or a comma list (default all)",
    )
    p.add_argument("--nproc", type=int, default=2, help="ranks of the multi-rank check (default 2)")
    p.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel worker processes"
    )
    p.add_argument(
        "--out", default="bench/results/large_batch.md", help="report path (plot: same name, .png)"
    )
    p.add_argument("--work-dir", default="runs/large_batch", help="run cache and CLI run directories")
    p.add_argument("--reuse", action="store_true", help="reuse runs cached in WORK_DIR/runs.jsonl")
    args = p.parse_args(list(argv))
    args.from_preset = set()
    if args.preset != "quadratic":
        args.task = args.preset
        for dest, value in PRESETS[args.preset].defaults:
            if getattr(args, dest) == p.get_default(dest):
                setattr(args, dest, value)
                args.from_preset.add(dest)
    return args


@dataclass
class Plan:
    """The resolved sweep."""

    task: str
    task_overrides: tuple[str, ...]
    target: float
    batches: list[int]
    seeds: int
    optimizers: dict[str, dict]
    reference_batch: int
    core: list[float]
    spacing: float
    max_extend: int
    window: int
    max_steps: int
    warmup_steps: int
    micro_batch: int
    eval_samples: int
    noise_batches: tuple[int, int, int] | None
    multirank_batches: list[int]
    multirank_optimizers: list[str]
    nproc: int
    notes: list[str] = field(default_factory=list)
    metric: str = "loss"
    warmup_rule: str = "fixed"
    probe: bool = False
    preset: str = "quadratic"
    first_seed: int = 0

    def warmup(self, batch: int) -> int:
        """Warmup steps at ``batch`` (the ``sqrt`` rule grows them with the lr of the sqrt/linear rules)."""
        if self.warmup_rule == "sqrt":
            return round(self.warmup_steps * math.sqrt(batch / self.reference_batch))
        return self.warmup_steps

    def spec(self, opt: str, batch: int, factor: float, seed: int) -> RunSpec:
        o = self.optimizers[opt]
        return RunSpec(
            task=self.task,
            optimizer=opt,
            batch=batch,
            base_lr=o["base_lr"] * factor,
            scale_rule=o["scale_rule"],
            reference_batch=self.reference_batch,
            seed=seed,
            target=self.target,
            max_steps=self.max_steps,
            micro_batch=min(self.micro_batch, max(1, batch // 2)) if self.probe else self.micro_batch,
            warmup_steps=self.warmup(batch),
            lr_factor=factor,
            eval_samples=self.eval_samples,
            overrides=self.task_overrides
            + tuple(o["overrides"])
            + (("tracking.noise_scale=true",) if self.probe else ()),
            noise_batches=self.noise_batches,
            metric=self.metric,
        )


class BadInput(ValueError):
    pass


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate the arguments against the preset and dist-opt's config schema (BadInput: one line)."""
    preset = PRESETS[args.preset if args.preset != "quadratic" else args.task]
    task_over = tuple(args.task_override) if args.task_override is not None else preset.overrides
    for o in task_over:
        if not o.startswith("task.") or "=" not in o:
            raise BadInput(f"--task-override: expected task.KEY=VALUE, got {o!r}")
    opts = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if not opts:
        raise BadInput("--optimizers: empty list")
    lrs = dict(preset.lrs)
    for k, v in args.lr:
        try:
            lrs[k] = _pos_float(v)
        except argparse.ArgumentTypeError as e:
            raise BadInput(f"--lr {k}: {e}") from None
    rules = dict(SCALE_RULES)
    for k, v in args.scale_rule:
        if v not in ("linear", "sqrt", "none"):
            raise BadInput(f"--scale-rule {k}: expected linear, sqrt or none, got {v!r}")
        rules[k] = v
    optimizers = {}
    for o in opts:
        if o not in lrs:
            raise BadInput(f"--optimizers: no base lr for {o!r} in the {args.task} preset; pass --lr {o}=LR")
        optimizers[o] = {
            "base_lr": lrs[o],
            "scale_rule": rules.get(o, "none"),
            "overrides": list(OPTIMIZER_OVERRIDES.get(o, ())),
        }
    batches = sorted(set(args.batches or preset.batches))
    for name, val, lo in (
        ("--seeds", args.seeds, 1),
        ("--first-seed", args.first_seed, 0),
        ("--grid-points", args.grid_points, 1),
        ("--max-extend", args.max_extend, 0),
        ("--window", args.window, 0),
        ("--warmup-steps", args.warmup_steps, 0),
        ("--micro-batch", args.micro_batch, 1),
        ("--eval-samples", 1 if args.eval_samples is None else args.eval_samples, 1),
        ("--workers", args.workers, 1),
        ("--nproc", args.nproc, 2),
    ):
        if val < lo:
            raise BadInput(f"{name}: must be >= {lo}, got {val}")
    if args.target is not None and not math.isfinite(args.target):
        raise BadInput(f"--target: expected a finite loss, got {args.target}")
    if args.max_steps is not None and args.max_steps < 1:
        raise BadInput(f"--max-steps: must be >= 1, got {args.max_steps}")
    if args.grid_spacing <= 1:
        raise BadInput(f"--grid-spacing: must be > 1, got {args.grid_spacing}")
    noise = None
    if args.noise_batches.strip().lower() != "none":
        try:
            nb = _int_list(args.noise_batches)
        except argparse.ArgumentTypeError as e:
            raise BadInput(f"--noise-batches: {e}") from None
        if len(nb) != 3 or nb[1] % nb[0] or nb[1] <= nb[0]:
            raise BadInput(
                "--noise-batches: expected b_small,b_big,draws with b_big a multiple > 1 of b_small, "
                f"got {args.noise_batches!r}"
            )
        noise = (nb[0], nb[1], nb[2])
    mr = args.multirank_batches.strip().lower()
    if mr == "none":
        multirank = []
    elif mr == "largest":
        multirank = [batches[-1]]
    else:
        try:
            multirank = _int_list(mr)
        except argparse.ArgumentTypeError as e:
            raise BadInput(f"--multirank-batches: {e}") from None
        if "multirank_batches" in args.from_preset:  # the preset's point, where --batches keeps it
            multirank = [b for b in multirank if b in batches] or [batches[0]]
        if set(multirank) - set(batches):
            raise BadInput(f"--multirank-batches: {sorted(set(multirank) - set(batches))} not in --batches")
    mro = args.multirank_optimizers.strip()
    mr_opts = list(optimizers) if mro == "all" else [o.strip() for o in mro.split(",") if o.strip()]
    if set(mr_opts) - set(optimizers):
        raise BadInput(
            f"--multirank-optimizers: {sorted(set(mr_opts) - set(optimizers))} not in --optimizers"
        )
    plan = Plan(
        task=preset.task_name or args.task,
        task_overrides=task_over,
        target=args.target if args.target is not None else preset.target,
        batches=batches,
        seeds=args.seeds,
        optimizers=optimizers,
        reference_batch=args.reference_batch or preset.reference_batch,
        core=[factor_key(f) for f in grid_factors(args.grid_points, args.grid_spacing)],
        spacing=args.grid_spacing,
        max_extend=args.max_extend,
        window=args.window,
        max_steps=args.max_steps or preset.max_steps,
        warmup_steps=args.warmup_steps,
        micro_batch=args.micro_batch,
        eval_samples=args.eval_samples or preset.eval_samples,
        noise_batches=noise,
        multirank_batches=multirank,
        multirank_optimizers=mr_opts,
        nproc=args.nproc,
        metric=preset.metric,
        warmup_rule=preset.warmup_rule,
        probe=preset.probe,
        preset=args.preset,
        first_seed=args.first_seed,
    )
    _check_configs(plan)
    return plan


def _check_configs(plan: Plan) -> None:
    """Every (optimizer, batch) must be a valid dist-opt config and fit the task (e.g. digits' 1437)."""
    from dist_opt.config import ConfigError, load_config
    from dist_opt.tasks import build_task

    kept = []
    size = None
    for b in plan.batches:
        for opt in plan.optimizers:
            spec = plan.spec(opt, b, 1.0, 0)
            try:
                cfg = load_config(None, spec.config_overrides("unused", micro_for(b, spec.micro_batch)))
            except ConfigError as e:
                raise BadInput(str(e).splitlines()[0]) from None
        if size is None:
            size = build_task(cfg.task, 0).train_size
        if size is not None and b > size:
            plan.notes.append(f"batch {b} skipped: larger than the {plan.task} training set ({size})")
            continue
        kept.append(b)
    if not kept:
        raise BadInput(f"--batches: none fits the {plan.task} training set ({size} samples)")
    plan.batches = kept
    plan.multirank_batches = [b for b in plan.multirank_batches if b in kept]
    if plan.noise_batches is not None and size is not None and plan.noise_batches[1] > size:
        plan.notes.append(
            f"B_simple draws of {plan.noise_batches[1]} exceed the training set ({size}): "
            "samples are drawn with replacement"
        )


# -- execution ------------------------------------------------------------------------------------
def _worker_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from bench.large_batch_run import ensure_world_one

    ensure_world_one()


def _load_cache(path: Path) -> dict[RunSpec, RunResult]:
    out: dict[RunSpec, RunResult] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = RunResult.from_json(json.loads(line))
                out[r.spec] = r
    return out


def _run_or_skip(job: tuple[RunSpec, float]) -> tuple[RunSpec, RunResult | None]:
    """Worker side: run the spec unless the sweep's deadline (a CLOCK_MONOTONIC time) has passed."""
    spec, deadline = job
    if time.monotonic() > deadline:
        return spec, None
    return spec, run_point(spec)


class Sweep:
    """Runs specs on a spawn-context process pool (each worker: one world-of-one gloo group), appending
    every result to a JSON-lines cache. Runs that would start after ``deadline`` are skipped."""

    def __init__(
        self, workers: int, cache_file: Path, reuse: bool, deadline: float, log: Callable[[str], None] = print
    ):
        self.workers, self.cache_file, self.deadline, self.log = workers, cache_file, deadline, log
        self.cache = _load_cache(cache_file) if reuse else {}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        if not reuse:
            cache_file.write_text("", encoding="utf-8")
        self.results: dict[RunSpec, RunResult] = {}
        self.skipped = 0
        self.pool = None

    def __enter__(self) -> Sweep:
        import multiprocessing as mp

        self.pool = mp.get_context("spawn").Pool(self.workers, initializer=_worker_init)
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.pool is None:
            return
        if exc_type is None:
            self.pool.close()
        else:  # interrupted or failed: do not wait for the runs in flight
            self.pool.terminate()
        self.pool.join()

    def run(self, specs: list[RunSpec]) -> None:
        todo = []
        for s in specs:
            if s in self.results:
                continue
            if s in self.cache:
                self.results[s] = self.cache[s]
            else:
                todo.append(s)
        if not todo:
            return
        assert self.pool is not None
        done = 0
        with self.cache_file.open("a", encoding="utf-8") as f:
            for spec, r in self.pool.imap_unordered(_run_or_skip, [(s, self.deadline) for s in todo]):
                if r is None:
                    self.skipped += 1
                    continue
                self.results[spec] = r
                f.write(json.dumps(r.to_json()) + "\n")
                f.flush()
                done += 1
        self.log(f"  {done} runs done ({len(self.results)} in total, {self.skipped} skipped at the budget)")


def run_sweep(plan: Plan, sweep: Sweep) -> None:
    """The core grid for every (optimizer, batch, seed), then grid extensions while the best lr of a
    (optimizer, batch) sits at an edge of what was run."""
    seeds = range(plan.first_seed, plan.first_seed + plan.seeds)
    sweep.log(
        f"core grid: {len(plan.optimizers)} optimizers x {len(plan.batches)} batches x "
        f"{len(plan.core)} lrs x {plan.seeds} seeds"
    )
    sweep.run(  # seed-major: a sweep cut short by its budget lacks seeds, not whole batches
        [
            plan.spec(o, b, f, s)
            for s in seeds
            for b in plan.batches
            for o in plan.optimizers
            for f in plan.core
        ]
    )
    for round_ in range(plan.max_extend):
        ext = []
        for o in plan.optimizers:
            for b in plan.batches:
                by: dict[float, list] = {}
                for sp, r in sweep.results.items():
                    if sp.optimizer == o and sp.batch == b:
                        by.setdefault(factor_key(sp.lr_factor), []).append(r.steps)
                if not by:
                    continue
                nxt = edge_extension({f: seed_stats(v) for f, v in by.items()}, plan.spacing)
                if nxt is not None:
                    ext += [plan.spec(o, b, factor_key(nxt), s) for s in seeds]
        if not ext:
            break
        sweep.log(f"grid extension {round_ + 1}: {len(ext) // plan.seeds} (optimizer, batch) points")
        sweep.run(ext)
    if plan.window:  # re-centre while the window's runs move the best lr (at most 3 rounds)
        big = plan.batches[-1]
        for _ in range(3):
            win = []
            for s in summarize(sweep.results.values(), plan.core):
                p = s.largest
                if p.batch == big and p.best is not None:
                    win += [
                        plan.spec(s.optimizer, big, f, seed)
                        for f in window_factors(p.best, plan.spacing, plan.window)
                        for seed in seeds
                    ]
            win = [w for w in win if w not in sweep.results]
            if not win:
                break
            sweep.log(f"stable-lr window at B={big}: {len(win) // plan.seeds} more (optimizer, lr) points")
            sweep.run(win)


def run_multirank(
    plan: Plan,
    summaries: list[OptimizerSummary],
    sweep: Sweep,
    work_dir: Path,
    log: Callable[[str], None],
    reuse: bool = False,
) -> list[CliResult]:
    """Re-run seed 0 at the best lr of the chosen batches through ``python -m dist_opt.train`` (with
    ``reuse``: take an earlier run of the same point from its directory instead)."""
    out = []
    for s in summaries:
        if s.optimizer not in plan.multirank_optimizers:
            continue
        for p in s.points:
            if p.batch not in plan.multirank_batches or p.best is None:
                continue
            spec = plan.spec(s.optimizer, p.batch, p.best, 0)
            mine = sweep.results.get(spec)
            if mine is None or mine.steps is None:
                continue
            run_dir = work_dir / f"cli_{s.optimizer}_B{p.batch}"
            what = f"{s.optimizer} B={p.batch} lr={spec.lr:.3g}"
            old = load_cli_point(spec, mine.steps, plan.nproc, str(run_dir)) if reuse else None
            if old is not None:
                log(f"  multi-rank: {what}, reused from {run_dir}")
                out.append(old)
                continue
            if time.monotonic() > sweep.deadline + 120:
                log("  multi-rank check skipped: over budget")
                return out
            log(f"  multi-rank: {what}, {mine.steps} steps, {plan.nproc} ranks")
            out.append(run_cli_point(spec, mine.steps, plan.nproc, str(run_dir)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        plan = make_plan(args)
    except BadInput as e:
        print(f"large_batch: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from bench.large_batch_report import ReportInputs, kept_notes, markdown, plot

    def log(msg: str) -> None:
        print(msg, flush=True)

    for n in plan.notes:
        log(f"note: {n}")
    t0 = time.monotonic()
    work = Path(args.work_dir)
    deadline = t0 + 0.9 * 60 * args.budget_minutes
    # SIGTERM -> SystemExit, so that the pool's workers are terminated on the way out
    old_handler = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        with Sweep(args.workers, work / "runs.jsonl", args.reuse, deadline, log) as sweep:
            run_sweep(plan, sweep)
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    summaries = summarize(sweep.results.values(), plan.core, plan.spacing, plan.window)
    cli = run_multirank(plan, summaries, sweep, work, log, args.reuse) if plan.multirank_batches else []
    wall = time.monotonic() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    import matplotlib.pyplot as plt

    plt.close(plot(summaries, plan.target, png))
    try:
        from bench.common import machine_info

        info = machine_info()
        machine = {k: info[k] for k in ("cpu", "cores", "torch", "date") if k in info}
    except Exception:  # noqa: BLE001 - the machine line is optional
        machine = {}
    inproc = {(sp.optimizer, sp.batch, sp.lr_factor, sp.seed): r.steps for sp, r in sweep.results.items()}
    inp = ReportInputs(
        command="python -m bench.large_batch " + shlex.join(argv) if argv else "python -m bench.large_batch",
        task=plan.task,
        task_overrides=list(plan.task_overrides),
        target=plan.target,
        batches=plan.batches,
        seeds=plan.seeds,
        grid=plan.core,
        spacing=plan.spacing,
        max_extend=plan.max_extend,
        window=plan.window,
        eval_samples=plan.eval_samples,
        max_steps=plan.max_steps,
        warmup_steps=plan.warmup_steps,
        micro_batch=plan.micro_batch,
        optimizers=plan.optimizers,
        reference_batch=plan.reference_batch,
        runs=len(sweep.results),
        wall_s=wall,
        cpu_s=sum(r.cpu_s for r in sweep.results.values()),
        workers=args.workers,
        incomplete=(f"{sweep.skipped} runs skipped at the time budget" if sweep.skipped else ""),
        machine=machine,
        noise_batches=plan.noise_batches,
        notes=plan.notes,
        about="" if args.task_override else PRESETS[args.task].about,
    )
    extra = network_sections(plan, sweep.results.values(), summaries) if plan.preset != "quadratic" else []
    text = markdown(inp, summaries, cli, inproc, png.name, kept_notes(out), extra)
    out.write_text(text, encoding="utf-8")
    log(f"wrote {out} and {png} ({len(sweep.results)} runs, {wall / 60:.1f} min)")
    for s in summaries:
        fit = f"S_min {s.fit.s_min:.3g}, B_crit {s.fit.b_crit:.3g}" if s.fit else "no fit"
        eff = f"{100 * s.efficiency16:.0f}%" if s.efficiency16 is not None else "—"
        log(
            f"  {s.optimizer}: {fit}, B_simple {s.b_simple and round(s.b_simple)}, efficiency@16x {eff}, "
            f"rule grid lrs ok at largest batch {s.largest.lrs_reaching}/{len(s.largest.core_factors)}, "
            f"window {s.largest.window_reaching}/{s.largest.window_run}"
        )
    bad_cli = [c for c in cli if c.returncode != 0]
    if bad_cli:
        print(
            f"large_batch: {len(bad_cli)} multi-rank run(s) failed:\n{bad_cli[0].stderr_tail}",
            file=sys.stderr,
        )
        return EXIT_FAIL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
