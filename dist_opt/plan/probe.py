"""What a finished probe run measured: B_noise, per-sample compute and per-parameter update cost.

Read from the run directory's ``metrics.jsonl`` (``noise/b_simple``, ``time/forward_backward_ms``,
``time/optimizer_ms``, ``time/step_ms``) and ``config.yaml`` (world size, global batch, engine,
ZeRO stage, precision). The parameter count comes from ``final_params.pt`` (written at the end of
a run) unless given.

The per-sample compute is ``time/forward_backward_ms`` per sample of a rank: on a multi-rank probe it
includes whatever gradient communication ran inside backward without being hidden, so on a slow
probe link it overstates compute a little (the cost model then adds the communication again).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_opt.tracking.metrics_file import read_metrics

B_NOISE_KEY = "noise/b_simple"
WINDOW = 0.2  # B_noise: median over the last 20 % of the logged values
_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}


class PlanError(ValueError):
    """A probe run the planner cannot use; the message is one line saying why and what to do."""


@dataclass(frozen=True)
class Probe:
    run_dir: Path
    engine: str
    zero_stage: int
    world: int
    global_batch: int
    params: int
    b_noise: float
    b_noise_steps: tuple[int, int, int, int]  # first and last step of the window, its size, all values
    sample_s: float  # forward + backward seconds per sample on one rank
    update_s_per_param: float | None  # None: time/optimizer_ms not logged
    step_ms: float
    timing_steps: tuple[int, int]
    grad_bytes: float
    param_bytes: float

    @property
    def mode(self) -> str:
        return ("ddp", "zero1", "zero2")[self.zero_stage]


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    out = []
    for r in rows:
        v = r.get(key)
        if "event" in r or not isinstance(r.get("step"), int) or isinstance(v, bool):
            continue
        if isinstance(v, int | float) and math.isfinite(v):
            out.append((r["step"], float(v)))
    return out


def _config(run_dir: Path) -> dict[str, Any]:
    import yaml

    path = run_dir / "config.yaml"
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError:
        raise PlanError(f"{path}: missing (not a dist-opt run directory?)") from None
    except yaml.YAMLError:
        raise PlanError(f"{path}: not valid YAML") from None
    if not isinstance(cfg, dict):
        raise PlanError(f"{path}: expected a mapping")
    return cfg


def count_params(run_dir: Path) -> int:
    """Parameter count from the run's ``final_params.pt`` (torch is imported only here)."""
    path = run_dir / "final_params.pt"
    if not path.is_file():
        raise PlanError(f"{path}: missing (the run did not finish); pass --params N")
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(sum(t.numel() for t in state.values()))


def read_probe(run_dir: str | Path, params: int | None = None) -> Probe:
    """The :class:`Probe` of a run directory; :class:`PlanError` when it lacks what the plan needs."""
    rd = Path(run_dir)
    if not rd.is_dir():
        raise PlanError(f"{rd}: no such run directory")
    metrics = rd / "metrics.jsonl"
    if not metrics.is_file():
        raise PlanError(f"{metrics}: missing (not a dist-opt run directory?)")
    try:
        rows = read_metrics(metrics)
    except ValueError as e:
        raise PlanError(str(e)) from None
    cfg = _config(rd)
    dist, data, prec = cfg.get("distributed") or {}, cfg.get("data") or {}, cfg.get("precision") or {}
    world = int(next((r["world_size"] for r in rows if r.get("event") == "summary"), dist.get("nproc") or 1))
    b_series = _series(rows, B_NOISE_KEY)
    if not b_series:
        raise PlanError(
            f"{metrics}: no {B_NOISE_KEY} logged; run the probe with >= 2 ranks (distributed.nproc=2), or on one "
            "rank with gradient accumulation >= 2 (data.micro_batch < data.global_batch), and tracking.noise_scale=true"
        )
    k = max(1, math.ceil(WINDOW * len(b_series)))
    window = b_series[-k:]
    b_noise = statistics.median(v for _, v in window)
    if not b_noise > 0:
        raise PlanError(
            f"{metrics}: median {B_NOISE_KEY} over steps {window[0][0]}-{window[-1][0]} is {b_noise:g} "
            "(gradient noise swamps the estimate); run the probe longer or with a larger batch"
        )
    fb = _series(rows, "time/forward_backward_ms")
    steps = _series(rows, "time/step_ms")
    if not fb or not steps:
        raise PlanError(f"{metrics}: no time/forward_backward_ms or time/step_ms logged")
    skip = len(fb) // 5  # the first 20 % of steps: warm-up (allocations, caches)
    fb, steps = fb[skip:], steps[len(steps) // 5 :]
    global_batch = int(data.get("global_batch") or 0)
    if global_batch < 1:
        raise PlanError(f"{rd / 'config.yaml'}: data.global_batch missing")
    zero = int(dist.get("zero_stage") or 0)
    n_params = params if params is not None else count_params(rd)
    opt = _series(rows, "time/optimizer_ms")[skip:]
    per_rank = n_params / world if zero > 0 else n_params
    update = statistics.median(v for _, v in opt) / 1e3 / per_rank if opt else None
    return Probe(
        run_dir=rd,
        engine=str(dist.get("engine") or "native"),
        zero_stage=zero if zero in (0, 1, 2) else 0,
        world=world,
        global_batch=global_batch,
        params=n_params,
        b_noise=b_noise,
        b_noise_steps=(window[0][0], window[-1][0], k, len(b_series)),
        sample_s=statistics.median(v for _, v in fb) / 1e3 / (global_batch / world),
        update_s_per_param=update,
        step_ms=statistics.median(v for _, v in steps),
        timing_steps=(fb[0][0], fb[-1][0]),
        grad_bytes=_BYTES.get(str(prec.get("reduce", "fp32")), 4.0),
        param_bytes=_BYTES.get(str(prec.get("params", "fp32")), 4.0),
    )
