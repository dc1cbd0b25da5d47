"""One point of the large-batch sweep: a dist-opt run that stops at a target loss.

In-process (:func:`run_point`): a world-of-one gloo group in this process, a real
:class:`dist_opt.train.Trainer`, and our own loop around :meth:`Trainer.train_step` so that the
run stops as soon as the held-out loss reaches the target. The global batch is split into
micro-batches of at most ``micro_batch`` samples (gradient accumulation), exactly as N ranks
would split it; ``tests/test_train.py`` proves N ranks == 1 process for the same global batch,
which is what makes running most of the sweep in-process legitimate.

Multi-rank (:func:`run_cli_point`): the real CLI ``python -m dist_opt.train`` with
``distributed.nproc`` ranks (torchrun's API), a fixed number of steps and an evaluation every
step; steps-to-target and the trainer's own ``noise/b_simple`` are read back from
``metrics.jsonl``.

Steps-to-target is the first optimizer step, on the evaluation schedule of
:func:`bench.large_batch_fit.eval_due`, whose held-out loss (what ``Trainer.evaluate`` computes on
a fixed, deterministic eval set; :class:`FixedEval` in-process) is <= target.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.large_batch_fit import eval_due, first_crossing, stalled

REACHED, DIVERGED, STALLED, BUDGET = "reached", "diverged", "stalled", "budget"


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one run (hashable: it is the key of a sweep point)."""

    task: str
    optimizer: str
    batch: int
    base_lr: float
    """``optimizer.lr``; the run's lr is ``base_lr`` scaled by ``scale_rule`` from ``reference_batch``."""
    scale_rule: str
    reference_batch: int
    seed: int
    target: float
    max_steps: int
    micro_batch: int = 512
    warmup_steps: int = 0
    diverge_factor: float = 3.0
    """Stop (diverged) when the eval loss exceeds this multiple of the initial eval loss."""
    eval_samples: int = 4096
    """``train.eval_max_samples``: the first this many held-out samples form the eval set."""
    stall_after: int = 200
    """Stop (stalled) from this step on when the second half of the run set no new best eval loss
    (a noise floor above the target); 0: never."""
    lr_factor: float = 1.0
    """The grid factor that produced ``base_lr`` (bookkeeping only)."""
    overrides: tuple[str, ...] = ()
    """Extra ``dotted.key=value`` config overrides (task shape, optimizer hyper-parameters)."""
    noise_batches: tuple[int, int, int] | None = (64, 1024, 16)
    """(b_small, b_big, draws) of the B_simple measurement at the target (None: skip; the trainer's
    own ``noise/b_simple``, logged during the run with ``tracking.noise_scale=true``, is kept instead)."""
    metric: str = "loss"
    """What ``target`` bounds: ``loss`` (held-out loss) or ``error`` (1 - held-out accuracy)."""

    @property
    def lr(self) -> float:
        """The learning rate after the scale rule (what ``dist_opt.schedules.scaled_lr`` computes)."""
        ratio = self.batch / self.reference_batch
        if self.scale_rule == "linear":
            return self.base_lr * ratio
        if self.scale_rule == "sqrt":
            return self.base_lr * math.sqrt(ratio)
        return self.base_lr

    def config_overrides(self, out_dir: str, micro_batch: int) -> list[str]:
        """The run's ``dotted.key=value`` overrides. ``tracking.noise_scale=true`` among ``overrides`` asks
        for the trainer's own B_simple, which a world of one measures from its micro-batches."""
        probe = ["tracking.noise_scale_micro=true"] if "tracking.noise_scale=true" in self.overrides else []
        return [
            f"task.name={self.task}",
            *self.overrides,
            *probe,
            f"run.seed={self.seed}",
            f"run.out_dir={out_dir}",
            f"data.global_batch={self.batch}",
            f"data.micro_batch={micro_batch}",
            f"train.steps={self.max_steps}",
            "train.progress=false",
            "train.log_every=1",
            f"train.eval_max_samples={self.eval_samples}",
            f"optimizer.name={self.optimizer}",
            f"optimizer.lr={self.base_lr!r}",
            "schedule.name=constant",
            f"schedule.warmup_steps={self.warmup_steps}",
            f"schedule.scale_rule={self.scale_rule}",
            f"schedule.reference_batch={self.reference_batch}",
            "tracking.wandb.mode=disabled",
            "checkpoint.at_end=false",
        ]


@dataclass
class RunResult:
    spec: RunSpec
    status: str
    """reached | diverged | stalled (no new best eval loss in the run's second half) | budget (step cap)."""
    steps: int | None
    """Steps to target (None unless reached)."""
    steps_run: int
    initial_loss: float
    final_loss: float
    wall_s: float
    cpu_s: float = 0.0
    """CPU time of this process for the run (independent of other load on the machine)."""
    b_simple: float | None = None
    trace_sigma: float | None = None
    g2: float | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(step, eval loss or error: ``spec.metric``) at every evaluation."""
    b_simple_online: list[tuple[int, float]] = field(default_factory=list)
    """(step, the trainer's ``noise/b_simple``) at every evaluation (empty unless the run logs it)."""

    @property
    def examples(self) -> int | None:
        return None if self.steps is None else self.steps * self.spec.batch

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"]["overrides"] = list(self.spec.overrides)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunResult:
        spec = dict(d["spec"])
        spec["overrides"] = tuple(spec.get("overrides", ()))
        if spec.get("noise_batches") is not None:
            spec["noise_batches"] = tuple(spec["noise_batches"])
        rest = {k: v for k, v in d.items() if k != "spec"}
        rest["curve"] = [tuple(x) for x in rest.get("curve", [])]
        rest["b_simple_online"] = [tuple(x) for x in rest.get("b_simple_online", [])]
        return cls(spec=RunSpec(**spec), **rest)


def micro_for(batch: int, micro_cap: int, world: int = 1) -> int:
    """Largest micro-batch <= ``micro_cap`` with ``batch`` divisible by micro x world."""
    per_rank = batch // world
    if per_rank * world != batch:
        raise ValueError(f"batch {batch} is not divisible by {world} ranks")
    m = min(micro_cap, per_rank)
    while per_rank % m:
        m -= 1
    return m


# -- in-process ---------------------------------------------------------------------------------
def ensure_world_one() -> None:
    """Join a world-of-one gloo group in this process (once)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    from dist_opt.dist.env import detect
    from dist_opt.dist.group import init_process_group

    init_process_group(detect({}), "gloo", 120.0)


def run_point(spec: RunSpec, scratch: str | None = None) -> RunResult:
    """Train until the eval loss reaches ``spec.target``, diverges, or ``spec.max_steps`` pass."""
    import torch

    from dist_opt.config import load_config
    from dist_opt.train import NonFiniteStorm, Trainer

    ensure_world_one()
    t0, c0 = time.perf_counter(), time.process_time()
    out_dir = scratch or tempfile.gettempdir()
    micro = micro_for(spec.batch, spec.micro_batch)
    cfg = load_config(None, spec.config_overrides(os.path.join(out_dir, "unused"), micro))
    tr = Trainer(cfg, torch.device("cpu"))
    evaluate = FixedEval(tr.task, min(spec.eval_samples, tr.task.eval_size), metric=spec.metric)
    initial = evaluate(tr.model)
    curve: list[tuple[int, float]] = [(0, initial)]
    online: list[tuple[int, float]] = []
    status, loss = BUDGET, initial
    if initial <= spec.target:
        status = REACHED
    while status == BUDGET and tr.step < spec.max_steps:
        try:
            metrics = tr.train_step()
        except NonFiniteStorm:
            status = DIVERGED
            break
        if eval_due(tr.step) or tr.step == spec.max_steps:
            if metrics.get("noise/b_simple") is not None:
                online.append((tr.step, float(metrics["noise/b_simple"])))
            loss = evaluate(tr.model)
            curve.append((tr.step, loss))
            if not math.isfinite(loss) or loss > spec.diverge_factor * initial:
                status = DIVERGED
            elif loss <= spec.target:
                status = REACHED
            elif spec.stall_after and tr.step >= spec.stall_after and stalled(curve):
                status = STALLED
    res = RunResult(
        spec=spec,
        status=status,
        steps=tr.step if status == REACHED else None,
        steps_run=tr.step,
        initial_loss=initial,
        final_loss=loss,
        wall_s=0.0,
        curve=curve,
        b_simple_online=online,
    )
    if status == REACHED and spec.noise_batches is not None:
        res.b_simple, res.trace_sigma, res.g2 = measure_b_simple(tr, *spec.noise_batches)
    elif status == REACHED and online:
        res.b_simple = online[-1][1]  # the trainer's EMA at the crossing step
    res.wall_s = time.perf_counter() - t0
    res.cpu_s = time.process_time() - c0
    return res


class FixedEval:
    """The held-out loss of ``Trainer.evaluate`` (``task.eval_sums`` over the first ``n`` eval samples,
    summed loss / count) on batches fetched once: the eval set is fixed, so fetching it again at every
    evaluation (most of ``Trainer.evaluate``'s cost on the synthetic stream) is skipped. One world, so
    no all-reduce; the result equals ``Trainer.evaluate`` up to float summation order."""

    def __init__(self, task: Any, n: int, chunk: int = 4096, metric: str = "loss") -> None:
        import torch

        if metric not in ("loss", "error"):
            raise ValueError(f"metric={metric!r}: expected 'loss' or 'error'")
        self.task, self.metric = task, metric
        self.batches = [task.eval_batch(torch.arange(lo, min(lo + chunk, n))) for lo in range(0, n, chunk)]

    def __call__(self, model: Any) -> float:
        loss, count, correct = 0.0, 0.0, 0.0
        for b in self.batches:
            out = self.task.eval_sums(model, b)
            loss += out["loss_sum"]
            count += out["count"]
            correct += out.get("correct", math.nan)
        return loss / count if self.metric == "loss" else 1.0 - correct / count


def measure_b_simple(trainer: Any, b_small: int, b_big: int, draws: int) -> tuple[float, float, float]:
    """B_simple of ``trainer.model`` as data parallelism would see it (McCandlish et al. 2018), without training.

    Each draw takes ``b_big`` fresh training samples, splits them into ``b_big // b_small``
    "ranks" of ``b_small``, and feeds ``mean_r |G_r|^2`` and ``|mean_r G_r|^2`` to
    :meth:`dist_opt.noise_scale.NoiseScale.estimates`; B_simple is the ratio of the means of
    ``tr(Sigma)`` and ``|G|^2`` over the draws (a ratio of averages, as the trainer's EMA).
    Samples are drawn with a generator of their own, far from the training stream (unlimited
    tasks) or uniformly from the training set (finite tasks).
    """
    import torch

    from dist_opt.noise_scale import NoiseScale

    if b_big % b_small or b_big <= b_small:
        raise ValueError(f"noise batches: b_big={b_big} must be a multiple > 1 of b_small={b_small}")
    task, model = trainer.task, trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1_000_003 + trainer.cfg.run.seed)
    size = task.train_size
    traces, g2s = [], []
    was_training = model.training
    model.train()
    for d in range(draws):
        if size is None:
            idx = torch.arange(b_big, dtype=torch.long) + (2**40 + d * b_big)
        else:
            idx = torch.randint(0, size, (b_big,), generator=g)
        local_sq, total = 0.0, [torch.zeros_like(p) for p in params]
        for r in range(b_big // b_small):
            batch = task.train_batch(idx[r * b_small : (r + 1) * b_small])
            grads = torch.autograd.grad(task.loss(model, batch), params)
            local_sq += float(sum(gr.double().square().sum() for gr in grads))
            for t, gr in zip(total, grads, strict=True):
                t.add_(gr)
        n = b_big // b_small
        big_sq = float(sum((t / n).double().square().sum() for t in total))
        trace, g2 = NoiseScale.estimates(local_sq / n, big_sq, b_small, b_big)
        traces.append(trace)
        g2s.append(g2)
    model.train(was_training)
    mean_trace, mean_g2 = sum(traces) / draws, sum(g2s) / draws
    b = mean_trace / mean_g2 if mean_g2 > 0 else math.nan
    return b, mean_trace, mean_g2


# -- multi-rank through the real CLI ------------------------------------------------------------
@dataclass
class CliResult:
    spec: RunSpec
    nproc: int
    micro: int
    returncode: int
    steps: int | None
    """First step (every step is evaluated) whose eval loss is <= target."""
    steps_on_schedule: int | None
    """The same crossing as the in-process evaluation schedule would report it."""
    eval_at: dict[int, float]
    """step -> eval loss logged by the CLI."""
    b_simple: float | None
    """``noise/b_simple`` logged by the trainer at the crossing step (its EMA over the last steps)."""
    wall_s: float
    stderr_tail: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"]["overrides"] = list(self.spec.overrides)
        d["eval_at"] = {str(k): v for k, v in self.eval_at.items()}
        return d


def run_cli_point(spec: RunSpec, steps: int, nproc: int, out_dir: str, timeout_s: float = 600.0) -> CliResult:
    """``python -m dist_opt.train`` on ``nproc`` local ranks for ``steps`` steps, eval every step."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    cfg_file = Path(out_dir) / "empty.yaml"
    cfg_file.write_text("{}\n", encoding="utf-8")
    micro = micro_for(spec.batch, spec.micro_batch, nproc)
    overrides = [o for o in spec.config_overrides(out_dir, micro) if not o.startswith("train.steps=")]
    overrides += [
        f"train.steps={steps}",
        "train.eval_every=1",
        f"distributed.nproc={nproc}",
        "tracking.noise_scale=true",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dist_opt.train", str(cfg_file), *overrides],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        check=False,
    )
    wall = time.perf_counter() - t0
    (Path(out_dir) / "cli.json").write_text(
        json.dumps({"returncode": proc.returncode, "wall_s": wall, "steps": steps}), encoding="utf-8"
    )
    return _cli_result(spec, nproc, micro, out_dir, proc.returncode, wall, proc.stderr)


def load_cli_point(spec: RunSpec, steps: int, nproc: int, out_dir: str) -> CliResult | None:
    """The result of an earlier :func:`run_cli_point` in ``out_dir`` for the same step count (None if
    there is none). Without its ``cli.json`` (older runs), a ``metrics.jsonl`` that logged an evaluation
    at ``steps`` counts as a finished run of unknown wall time."""
    d = Path(out_dir)
    micro = micro_for(spec.batch, spec.micro_batch, nproc)
    if (d / "cli.json").exists():
        info = json.loads((d / "cli.json").read_text(encoding="utf-8"))
        if info.get("steps") != steps:
            return None
        return _cli_result(spec, nproc, micro, out_dir, int(info["returncode"]), float(info["wall_s"]), "")
    res = _cli_result(spec, nproc, micro, out_dir, 0, math.nan, "")
    return res if steps in res.eval_at else None


def _cli_result(
    spec: RunSpec, nproc: int, micro: int, out_dir: str, returncode: int, wall: float, stderr: str
) -> CliResult:
    """Steps to target and the trainer's ``noise/b_simple`` read back from ``out_dir/metrics.jsonl``."""
    evals: dict[int, float] = {}
    b_simple: dict[int, float] = {}
    metrics = Path(out_dir) / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            step = rec.get("step")
            if step is None:
                continue
            key = "eval/loss" if spec.metric == "loss" else "eval/accuracy"
            if key in rec:
                v = float(rec[key])
                evals[int(step)] = v if spec.metric == "loss" else 1.0 - v
            if rec.get("noise/b_simple") is not None:
                b_simple[int(step)] = float(rec["noise/b_simple"])
    ordered = sorted(evals.items())
    crossing = first_crossing([s for s, _ in ordered], [v for _, v in ordered], spec.target)
    sched = [(s, v) for s, v in ordered if eval_due(s)]
    on_schedule = first_crossing([s for s, _ in sched], [v for _, v in sched], spec.target)
    return CliResult(
        spec=spec,
        nproc=nproc,
        micro=micro,
        returncode=returncode,
        steps=crossing,
        steps_on_schedule=on_schedule,
        eval_at=evals,
        b_simple=b_simple.get(crossing) if crossing is not None else None,
        wall_s=wall,
        stderr_tail=stderr[-2000:] if returncode else "",
    )
