"""Step-time / memory / traffic benchmark: dist-opt's sharded optimizer against DDP, torch ZeRO and DeepSpeed.

    python -m bench.step            # full run (~25M-parameter model), writes bench/results/step.md
    python -m bench.step --quick    # tiny model, a few steps, prints the table (smoke test)

Every configuration runs in ``--world`` fresh gloo ranks on CPU (``OMP_NUM_THREADS=1``), so the
peak RSS reported is that configuration's. Per step: forward of a regression (MSE) loss on random
inputs, backward, optimizer step, zero_grad. See the notes written into the results file for how
each number is obtained.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    AllocCounter,
    CommCounter,
    copy_bandwidth,
    fmt_bytes,
    machine_info,
    make_25m_model,
    n_params,
    peak_rss_bytes,
    run_ranks,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "step.md"
BASELINE = "ddp-adamw"
FUSED_BASELINE = "ddp-adamw-fused"

# minimum memory traffic of one update, bytes per parameter of the updated shard (fp32):
#   adamw: read p, g, m, v + write p, m, v (one pass)                                   = 28
#   lamb:  pass 1 read g, m, v, p, write m, v (norms of p and u); pass 2 read m, v, p, write p = 40
#   lars:  pass 1 read p, g (norms); pass 2 read p, g, b, write b, p                          = 28
BYTES_PER_PARAM = {"adamw": 28, "lamb": 40, "lars": 28}

FULL = {"width": 512, "hidden": 2048, "blocks": 12, "batch": 32, "warmup": 3, "steps": 15}
QUICK = {"width": 64, "hidden": 256, "blocks": 2, "batch": 8, "warmup": 1, "steps": 3}

CONFIGS: list[dict[str, Any]] = (
    [
        {"key": "ddp-adamw", "label": "DDP + torch AdamW(foreach)", "kind": "ddp", "rule": "adamw"},
        {
            "key": "ddp-adamw-fused",
            "label": "DDP + torch AdamW(fused)",
            "kind": "ddp",
            "rule": "adamw",
            "fused": True,
        },
        {
            "key": "torch-zero",
            "label": "DDP + torch ZeroRedundancyOptimizer(AdamW)",
            "kind": "torch-zero",
            "rule": "adamw",
        },
        {
            "key": "deepspeed-z1",
            "label": "DeepSpeed ZeRO-1 AdamW (cpu)",
            "kind": "deepspeed",
            "rule": "adamw",
        },
    ]
    + [
        {
            "key": f"distopt-{r}-z{z}",
            "label": f"dist-opt {r}, zero {z}",
            "kind": "distopt",
            "rule": r,
            "stage": z,
        }
        for r in ("adamw", "lamb", "lars")
        for z in (0, 1, 2)
    ]
    + [
        {
            "key": "distopt-adamw-z2-blocking",
            "label": "dist-opt adamw, zero 2, blocking all-gather",
            "kind": "distopt",
            "rule": "adamw",
            "stage": 2,
            "overlap": False,
        }
    ]
)
LR = {"adamw": 1e-3, "lamb": 1e-3, "lars": 1e-2}
WEIGHT_DECAY = 0.01


# -- runners (inside a rank) -----------------------------------------------------------------------
class _Timed:
    """Wraps an optimizer's ``step`` on the instance and records each call's duration."""

    def __init__(self, optim: Any):
        self.times: list[float] = []
        orig = optim.step

        def step(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                self.times.append(time.perf_counter() - t0)

        optim.step = step


def _state_bytes(optim: Any) -> int:
    total = 0
    for st in optim.state.values():
        for v in st.values():
            if hasattr(v, "element_size"):
                total += v.numel() * v.element_size()
    return total


class _TorchRunner:
    """DDP with torch.optim.AdamW (foreach or fused) or with ZeroRedundancyOptimizer(AdamW)."""

    def __init__(self, model: Any, spec: dict[str, Any], world: int):
        import torch
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.model = DDP(model)
        kw = {"lr": LR["adamw"], "weight_decay": WEIGHT_DECAY}
        kw.update({"fused": True} if spec.get("fused") else {"foreach": True})
        if spec["kind"] == "torch-zero":
            from torch.distributed.optim import ZeroRedundancyOptimizer

            self.opt = ZeroRedundancyOptimizer(
                self.model.parameters(), optimizer_class=torch.optim.AdamW, **kw
            )
            self.inner = self.opt.optim
        else:
            self.opt = torch.optim.AdamW(self.model.parameters(), **kw)
            self.inner = self.opt
        self.outer_t = _Timed(self.opt)
        self.inner_t = _Timed(self.inner) if self.inner is not self.opt else self.outer_t
        self.world = world
        self.psi = n_params(model)

    def step(self, x: Any, y: Any) -> float:
        import torch

        loss = torch.nn.functional.mse_loss(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        return float(loss.detach())

    def update_times(self) -> list[float]:
        return self.inner_t.times

    def state_bytes(self) -> int:
        return _state_bytes(self.inner)

    def shard_numel(self) -> int:
        return sum(p.numel() for g in self.inner.param_groups for p in g["params"])

    def comm_bytes(self, counted: int) -> int:
        n = self.world
        return int(2 * (n - 1) / n * 4 * self.psi) + counted

    def extras(self) -> dict[str, float]:
        return {}


class _DeepSpeedRunner:
    """DeepSpeed ZeRO stage 1 with its AdamW (FusedAdam, CPU op), fp32, on the existing gloo group."""

    def __init__(self, model: Any, spec: dict[str, Any], world: int):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # torch.distributed is up: DS just wraps it
        cfg = {
            "train_micro_batch_size_per_gpu": spec["batch"],
            "gradient_accumulation_steps": 1,
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": LR["adamw"],
                    "weight_decay": WEIGHT_DECAY,
                    "betas": [0.9, 0.999],
                    "eps": 1e-8,
                },
            },
            "zero_optimization": {"stage": 1},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, self.opt, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=cfg
        )
        self.inner = self.opt.optimizer
        self.outer_t = _Timed(self.opt)
        self.inner_t = _Timed(self.inner)

    def step(self, x: Any, y: Any) -> float:
        import torch

        loss = torch.nn.functional.mse_loss(self.engine(x), y)
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.detach())

    def update_times(self) -> list[float]:
        return self.inner_t.times

    def state_bytes(self) -> int:
        return _state_bytes(self.inner)

    def shard_numel(self) -> int:
        return sum(t.numel() for t in self.opt.single_partition_of_fp32_groups)

    def comm_bytes(self, counted: int) -> int:
        return counted

    def extras(self) -> dict[str, float]:
        # ZeRO-1 keeps an fp32 master copy of the partition apart from the model's parameters
        master = sum(t.numel() * t.element_size() for t in self.opt.single_partition_of_fp32_groups)
        return {"master_partition_bytes": float(master)}


class _DistOptRunner:
    """dist-opt's ShardedOptimizer in a plain loop (no DDP wrapper: gradient hooks do the sync); the
    parameter all-gather overlaps the next forward unless the config says ``overlap: False``."""

    def __init__(self, model: Any, spec: dict[str, Any], world: int):
        from dist_opt.engine.sharded import ShardedOptimizer

        self.model = model
        self.opt = ShardedOptimizer(
            model.named_parameters(),
            spec["rule"],
            lr=LR[spec["rule"]],
            weight_decay=WEIGHT_DECAY,
            zero_stage=spec["stage"],
            overlap_param_gather=spec.get("overlap", True),
        )
        self.outer_t = _Timed(self.opt)
        self.parts: dict[str, list[float]] = {
            "grad_comm_wait_ms": [],
            "optimizer_ms": [],
            "param_all_gather_ms": [],
            "param_gather_exposed_ms": [],
        }
        self._stepped = False
        self.ledger_bytes = 0

    def step(self, x: Any, y: Any) -> float:
        import torch

        loss = torch.nn.functional.mse_loss(self.model(x), y)
        loss.backward()
        if self._stepped:  # the previous step's all-gather is complete by now (backward waits for it)
            self.parts["param_gather_exposed_ms"].append(self.opt.param_gather_exposed_ms)
        self.opt.step()
        self.opt.zero_grad()
        self._stepped = True
        for k, v in self.parts.items():
            if k != "param_gather_exposed_ms":
                v.append(float(self.opt.last_stats.get(f"time/{k}", float("nan"))))
        return float(loss.detach())

    def update_times(self) -> list[float]:
        return [ms / 1e3 for ms in self.parts["optimizer_ms"]]

    def profile_update(self, x: Any, y: Any, top: int = 4) -> list[tuple[str, float, float, int]]:
        """One more step with the rule's update under torch.profiler: the ``top`` operators by self
        CPU time as (name, ms, share of the update, bytes they allocated)."""
        import torch
        from torch.profiler import ProfilerActivity, profile

        rule, held = self.opt.rule, {}
        orig = rule.step

        def profiled(groups: Any, ctx: Any) -> None:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                orig(groups, ctx)
            held["prof"] = prof

        rule.step = profiled
        try:
            with torch.enable_grad():
                self.step(x, y)
        finally:
            del rule.step  # back to the class's method
        events = list(held["prof"].key_averages())
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        return [
            (
                e.key,
                e.self_cpu_time_total / 1e3,
                e.self_cpu_time_total / total,
                max(0, int(e.self_cpu_memory_usage)),
            )
            for e in events[:top]
        ]

    def state_bytes(self) -> int:
        return self.opt.state_bytes()

    def shard_numel(self) -> int:
        lay = self.opt.layout
        return lay.shard_numel if lay.world > 1 else lay.full_numel

    def comm_bytes(self, counted: int) -> int:
        return self.ledger_bytes

    def extras(self) -> dict[str, float]:
        out = {k: statistics.median(v) for k, v in self.parts.items() if v}
        out["skipped_steps"] = float(self.opt.skipped_steps)
        return out


_RUNNERS = {
    "ddp": _TorchRunner,
    "torch-zero": _TorchRunner,
    "deepspeed": _DeepSpeedRunner,
    "distopt": _DistOptRunner,
}


def bench_rank(rank: int, world: int, spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration on one rank: warmup, timed steps, then one step with collectives counted."""
    import torch

    rss_start = peak_rss_bytes()
    bw_concurrent = None
    if spec.get("probe_bw_numel"):  # every rank copies at the same time: the per-rank share of bandwidth
        import torch.distributed as dist

        dist.barrier()
        bw_concurrent = copy_bandwidth(spec["probe_bw_numel"], repeats=5)
    model = make_25m_model(spec["width"], spec["hidden"], spec["blocks"], seed=0)
    gen = torch.Generator().manual_seed(1000 + rank)
    batches = [
        (
            torch.randn(spec["batch"], spec["width"], generator=gen),
            torch.randn(spec["batch"], spec["width"], generator=gen),
        )
        for _ in range(2)
    ]
    runner = _RUNNERS[spec["kind"]](model, spec, world)
    rss_setup = peak_rss_bytes()
    times, losses = [], []
    load = [os.getloadavg()[0]]
    for i in range(spec["warmup"]):
        losses.append(runner.step(*batches[i % 2]))
    # timed steps, with every collective issued from Python counted (a wrapper call per collective)
    comm = getattr(runner, "opt", None)
    comm = getattr(comm, "comm", None) if isinstance(runner, _DistOptRunner) else None
    if comm is not None:
        comm.ledger.reset()
    with CommCounter(world) as counter:
        for i in range(spec["steps"]):
            x, y = batches[i % 2]
            t0 = time.perf_counter()
            losses.append(runner.step(x, y))
            times.append(time.perf_counter() - t0)
    load.append(os.getloadavg()[0])
    n = spec["steps"]
    if comm is not None:
        runner.ledger_bytes = round(comm.ledger.total_bytes / n)
    counted = round(counter.total_bytes / n)
    profile = runner.profile_update(*batches[0]) if isinstance(runner, _DistOptRunner) else []
    with AllocCounter() as allocs:  # one more step: tensors of >= 1 MiB it creates
        runner.step(*batches[1])
    opt_step = runner.outer_t.times[spec["warmup"] :]
    update = runner.update_times()[spec["warmup"] :]
    return {
        "step_s": statistics.median(times),
        "step_min_s": min(times),
        "opt_step_s": statistics.median(opt_step) if opt_step else None,
        "update_s": statistics.median(update) if update else None,
        "state_bytes": runner.state_bytes(),
        "shard_numel": runner.shard_numel(),
        "params": n_params(model),
        "comm_bytes": runner.comm_bytes(counted),
        "counted_bytes": counted,
        "counted_calls": {k: v / n for k, v in counter.calls.items()},
        "rss_start": rss_start,
        "rss_setup": rss_setup,
        "peak_rss": peak_rss_bytes(),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "extras": runner.extras(),
        "bw_concurrent": bw_concurrent,
        "load": max(load),
        "profile": profile,
        "allocs": (allocs.count, allocs.bytes),
    }


def _prepare_deepspeed(rank: int, world: int) -> float:
    """Build DeepSpeed's CPU ops (JIT, cached in ~/.cache/torch_extensions) outside any timing."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    t0 = time.perf_counter()
    deepspeed.init_distributed(dist_backend="gloo")
    get_accelerator().create_op_builder("FusedAdamBuilder").load()
    return time.perf_counter() - t0


# -- aggregation and report ------------------------------------------------------------------------
def summarize(cfg: dict[str, Any], per_rank: list[dict[str, Any]], bw: float) -> dict[str, Any]:
    """One table row from the ranks' results (times: slowest rank; memory: largest rank)."""
    r0 = per_rank[0]
    shard = max(r["shard_numel"] for r in per_rank)
    update = (
        max(r["update_s"] for r in per_rank) if all(r["update_s"] is not None for r in per_rank) else None
    )
    bound = BYTES_PER_PARAM[cfg["rule"]] * shard / bw
    extras: dict[str, float] = {}
    for k in r0["extras"]:
        extras[k] = max(r["extras"][k] for r in per_rank)
    return {
        **cfg,
        "ok": True,
        "step_s": max(r["step_s"] for r in per_rank),
        "step_min_s": max(r["step_min_s"] for r in per_rank),
        "load": max(r["load"] for r in per_rank),
        "opt_step_s": max(r["opt_step_s"] for r in per_rank),
        "update_s": update,
        "bound_s": bound,
        "bytes_per_param": BYTES_PER_PARAM[cfg["rule"]],
        "state_bytes": max(r["state_bytes"] for r in per_rank),
        "shard_numel": shard,
        "params": r0["params"],
        "peak_rss": max(r["peak_rss"] for r in per_rank),
        "rss_start": max(r["rss_start"] for r in per_rank),
        "rss_setup": max(r["rss_setup"] for r in per_rank),
        "comm_bytes": max(r["comm_bytes"] for r in per_rank),
        "counted_bytes": max(r["counted_bytes"] for r in per_rank),
        "counted_calls": r0["counted_calls"],
        "first_loss": r0["first_loss"],
        "last_loss": r0["last_loss"],
        "extras": extras,
        "profile": r0["profile"],
        "allocs": max((r["allocs"] for r in per_rank), key=lambda a: a[1]),
    }


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or not b else f"{a / b:.2f}×"


def _ms(s: float | None) -> str:
    return "—" if s is None else f"{1e3 * s:.1f}"


TABLE_HEADER = (
    "| config | step ms (median) | × DDP+AdamW | × DDP+AdamW(fused) | opt state / rank | × unsharded "
    "| peak RSS / rank "
    "| comm / step / rank | update ms | bound ms (B/param) | × bound |"
)
TABLE_COLUMNS = TABLE_HEADER.count("|") - 1


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["key"] == BASELINE and r["ok"]), None)
    fused = next((r for r in rows if r["key"] == FUSED_BASELINE and r["ok"]), None)
    lines = [TABLE_HEADER, "|" + "---|" * TABLE_COLUMNS]
    for r in rows:
        if not r["ok"]:
            cells = [r["label"], "error: " + r["error"].replace("|", "/")] + ["—"] * (TABLE_COLUMNS - 2)
        else:
            cells = [
                r["label"],
                _ms(r["step_s"]),
                _ratio(r["step_s"], base and base["step_s"]),
                _ratio(r["step_s"], fused and fused["step_s"]),
                fmt_bytes(r["state_bytes"]),
                _ratio(r["state_bytes"], base and base["state_bytes"]),
                fmt_bytes(r["peak_rss"]),
                fmt_bytes(r["comm_bytes"]),
                _ms(r["update_s"]),
                f"{_ms(r['bound_s'])} ({r['bytes_per_param']})",
                _ratio(r["update_s"], r["bound_s"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_details(rows: Sequence[dict[str, Any]], bw2: float | None) -> str:
    """Second table: where a step's time goes, the update vs the concurrent-bandwidth bound, traffic."""
    lines = [
        "| config | step ms min | opt.step() ms | grad-sync wait ms | param all-gather ms in step "
        "| param all-gather exposed ms | update × bound at concurrent bw | peak RSS at start / after setup "
        "| tensors ≥ 1 MiB created / step | collectives per step | load avg | loss first → last |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        if not r["ok"]:
            continue
        ex = r["extras"]

        def part(key: str, ex: dict[str, float] = ex) -> str:
            return _ms(ex[key] / 1e3) if key in ex else "—"

        bound2 = r["bytes_per_param"] * r["shard_numel"] / bw2 if bw2 else None
        calls = ", ".join(f"{k}×{v:g}" for k, v in sorted(r["counted_calls"].items())) or "none from Python"
        lines.append(
            f"| {r['label']} | {_ms(r['step_min_s'])} | {_ms(r['opt_step_s'])} | {part('grad_comm_wait_ms')} "
            f"| {part('param_all_gather_ms')} | {part('param_gather_exposed_ms')} "
            f"| {_ratio(r['update_s'], bound2)} "
            f"| {fmt_bytes(r['rss_start'])} / {fmt_bytes(r['rss_setup'])} "
            f"| {r['allocs'][0]} ({fmt_bytes(r['allocs'][1])}) | {calls} | {r['load']:.1f} | {r['first_loss']:.4f} → {r['last_loss']:.4f} |"
        )
    return "\n".join(lines)


def render_profiles(rows: Sequence[dict[str, Any]], limit: float = 2.0) -> str:
    """The update's top operators (rank 0, one profiled step) for dist-opt rows over ``limit``× their bound."""
    out = []
    for r in rows:
        if (
            not r["ok"]
            or not r.get("profile")
            or r["update_s"] is None
            or r["update_s"] <= limit * r["bound_s"]
        ):
            continue
        ops = "; ".join(
            f"`{name}` {100 * share:.0f}% ({ms:.1f} ms{f', allocates {fmt_bytes(mem)}' if mem else ''})"
            for name, ms, share, mem in r["profile"]
        )
        out.append(f"- {r['label']} ({r['update_s'] / r['bound_s']:.1f}× its bound): {ops}")
    if not out:
        return "- every dist-opt update is within 2× of its bound"
    out.append(
        "- (an operator that allocates its result writes into freshly mapped memory every step: page faults "
        "and zero-filling make it several times slower than an in-place operator over the same elements)"
    )
    return "\n".join(out)


def check_targets(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The benchmark's targets as 'PASS/MISS: ...' lines (only for rows that ran)."""
    by = {r["key"]: r for r in rows if r["ok"]}
    base, fused = by.get(BASELINE), by.get(FUSED_BASELINE)
    out = []

    def line(ok: bool, text: str) -> None:
        out.append(f"- {'PASS' if ok else 'MISS'}: {text}")

    z2 = by.get("distopt-adamw-z2")
    if base and z2:
        s = z2["state_bytes"] / base["state_bytes"]
        line(s <= 0.52, f"dist-opt adamw zero 2 optimizer state {s:.3f}× unsharded (target ≤ 0.52×)")
    if fused:
        if z2:
            t = z2["step_s"] / fused["step_s"]
            line(t <= 0.90, f"dist-opt adamw zero 2 step time {t:.2f}× DDP+AdamW(fused) (target ≤ 0.90×)")
            saved = fused["state_bytes"] - z2["state_bytes"]
            cap = fused["peak_rss"] - saved
            line(
                z2["peak_rss"] <= cap,
                f"dist-opt adamw zero 2 peak RSS {fmt_bytes(z2['peak_rss'])} vs DDP+AdamW(fused)'s "
                f"{fmt_bytes(fused['peak_rss'])} minus the {fmt_bytes(saved)} of state saved = {fmt_bytes(cap)} "
                "(target ≤)",
            )
        for rule in ("lamb", "lars"):
            if f"distopt-{rule}-z2" in by:
                t = by[f"distopt-{rule}-z2"]["step_s"] / fused["step_s"]
                line(
                    t <= 0.95, f"dist-opt {rule} zero 2 step time {t:.2f}× DDP+AdamW(fused) (target ≤ 0.95×)"
                )
    for key, limit in (("distopt-adamw-z2", 2.0), ("distopt-lamb-z2", 1.5), ("distopt-lars-z2", 1.5)):
        if key in by and by[key]["update_s"] is not None:
            r = by[key]
            q = r["update_s"] / r["bound_s"]
            line(
                q <= limit,
                f"{r['label']}: update {1e3 * r['update_s']:.1f} ms vs bound "
                f"{1e3 * r['bound_s']:.1f} ms = {q:.2f}× (target ≤ {limit:g}×)",
            )
    blocking = by.get("distopt-adamw-z2-blocking")
    if z2 and blocking:
        before = blocking["extras"].get("param_gather_exposed_ms")
        after = z2["extras"].get("param_gather_exposed_ms")
        if before and after is not None:
            hidden = 1 - after / before
            line(
                hidden >= 0.5,
                f"parameter all-gather, adamw zero 2: exposed {before:.1f} ms blocking → {after:.1f} ms "
                f"overlapped with the next forward, {100 * hidden:.0f}% hidden (target ≥ 50%)",
            )
    return out


NOTES = """\
How the numbers are obtained:
- Each configuration runs in {world} fresh processes (forked from a forkserver that has only imported torch), gloo
  over loopback, OMP_NUM_THREADS=1 and torch.set_num_threads(1); model: {blocks} residual blocks
  x + Linear({hidden}→{width})(GELU(Linear({width}→{hidden})(LayerNorm(x)))), Ψ = {params:,} parameters, fp32, batch
  {batch} per rank of random inputs/targets, MSE loss, lr {lr_adamw} (LARS {lr_lars}), weight decay {wd}. Step = forward +
  backward + optimizer step + zero_grad, timed with perf_counter on each rank; {warmup} warmup steps, then {steps} timed
  steps; "step ms" is the median, "step ms min" the fastest, each the slowest rank's. Every configuration ran
  {rounds} time(s) (rounds one after the other); each row is the round with the lower median, all of its numbers from
  that round. "load avg" is the highest 1-minute load average the ranks saw (the ranks and their gloo threads account
  for about world + 1; clearly more means other processes competed for the CPUs and the times are inflated).
- opt state / rank: dist-opt `opt.state_bytes()`; torch: sum of the tensors in the (local) optimizer's `state`;
  DeepSpeed: the same over the inner FusedAdam's state (exp_avg, exp_avg_sq of this rank's flat partition; DeepSpeed
  also holds an fp32 master copy of the partition, {ds_master} per rank, not included). "× unsharded" is relative to
  DDP + AdamW's state.
- peak RSS / rank: VmHWM of each rank's process at the end (largest rank); ru_maxrss is not used because Linux
  carries it over fork + exec from the parent. "peak RSS at start / after setup" in the details: after importing
  torch and joining the group (before the model exists) / after building the model and the optimizer (before the
  first step).
- comm / step / rank: bandwidth-optimal ring traffic per rank, all-reduce 2(N-1)/N·S, reduce-scatter / all-gather /
  broadcast / reduce (N-1)/N·S (S = full tensor bytes), averaged over the timed steps. dist-opt: `opt.comm.ledger`
  (cross-checked against a count taken at the ProcessGroup methods: {crosscheck}). DDP: its all-reduce is issued
  from C++, so it is computed as 2(N-1)/N·4Ψ; torch ZeRO adds its parameter broadcasts, counted at the ProcessGroup
  methods. DeepSpeed: all of its collectives are issued from Python and are counted at the ProcessGroup methods.
- dist-opt rows overlap the parameter all-gather with the next forward (`overlap_param_gather=True`: async
  all-gather per bucket, each module's forward-pre-hook waits for the bucket holding its parameters); the row
  "blocking all-gather" completes it inside `opt.step()`. "param all-gather ms in step": the part of `opt.step()`
  after the update (packing, launching, and waiting when blocking); "param all-gather exposed ms": the time the
  gather held the rank up in all (that part plus the waits in the next forward), `opt.param_gather_exposed_ms`
  read after the next backward. "× DDP+AdamW(fused)": against DDP with `torch.optim.AdamW(fused=True)`.
- tensors ≥ 1 MiB created / step: one more step (forward, backward, step, zero_grad) after the timed ones under a
  `TorchDispatchMode` that counts every operator output of ≥ 1 MiB whose storage is new (not an input's, so views
  and in-place results are not counted); the largest rank's count and bytes. It sees activations, autograd's
  gradients and temporaries made through torch's operators, not memory gloo or DDP's C++ reducer allocate.
- update ms: the update alone. dist-opt: the rule's step on this rank's shard (`last_stats["time/optimizer_ms"]`, no
  gradient wait, no norm of the gradient, no all-gather); torch / DeepSpeed: the inner optimizer's `step()` (torch
  ZeRO: its local AdamW; DeepSpeed: FusedAdam on the partition). "opt.step() ms" in the details is the whole call
  (DeepSpeed: `engine.step()`).
- bound ms: minimum memory traffic of the update ÷ copy bandwidth; bytes per parameter of the updated shard in
  brackets (AdamW 28: read p, g, m, v and write p, m, v; LAMB 40: two passes because the trust ratio needs ‖u‖ before
  p can be written; LARS 28: a norm pass over p, g, then read p, g, b and write b, p). dist-opt's LAMB moves 56
  (λp into a scratch u, fused AdamW adds the direction to u, norms of p and u, p -= s·u), 1.4× its bound. Copy bandwidth: best of
  `dst.copy_(src)` on {bw_mib} MiB fp32 tensors on one thread, counting 8 bytes per element (read + write), taken
  before and after the configurations run:
  {bw:.2f} GB/s alone (the bound uses this); {bw2:.2f} GB/s per rank when {world} ranks copy at the same time (the
  ranks do update at the same time; the details give the update against that bound too). A ratio below 1 is
  possible: `copy_` also reads every destination cache line before writing it (write-allocate), which an in-place
  update (p, m, v read then written) does not pay, so the copy figure understates the usable bandwidth.
"""


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    sizes = dict(QUICK if args.quick else FULL)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if args.warmup is not None:
        sizes["warmup"] = args.warmup
    if args.steps is not None:
        sizes["steps"] = args.steps
    configs = CONFIGS
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = sorted(set(keys) - {c["key"] for c in CONFIGS})
        if unknown:
            raise SystemExit(
                f"--only: unknown config(s) {', '.join(unknown)}; known: "
                f"{', '.join(c['key'] for c in CONFIGS)}"
            )
        configs = [c for c in CONFIGS if c["key"] in keys]
    bw_numel = 2**20 if args.quick else 64 * 2**20
    bw = copy_bandwidth(bw_numel)
    info: dict[str, Any] = {
        "sizes": sizes,
        "bw": bw,
        "bw2": None,
        "machine": machine_info(),
        "world": args.world,
        "rounds": args.rounds,
        "bw_numel": bw_numel,
    }
    if any(c["kind"] == "deepspeed" for c in configs):
        try:
            info["ds_build_s"] = run_ranks(
                _prepare_deepspeed, 1, timeout_s=900, extra_env={"DS_ACCELERATOR": "cpu"}
            )[0]
        except Exception as e:  # noqa: BLE001 - the DeepSpeed row reports it
            info["ds_error"] = _first_line(e)
    best: dict[str, dict[str, Any]] = {}
    for rnd in range(args.rounds):
        for cfg in configs:
            spec = {**sizes, **cfg, "probe_bw_numel": bw_numel if info["bw2"] is None else 0}
            t0 = time.perf_counter()
            if cfg["kind"] == "deepspeed" and "ds_error" in info:
                best[cfg["key"]] = {**cfg, "ok": False, "error": info["ds_error"]}
                continue
            env = {"DS_ACCELERATOR": "cpu"} if cfg["kind"] == "deepspeed" else {}
            try:
                per_rank = run_ranks(bench_rank, args.world, (spec,), timeout_s=args.timeout, extra_env=env)
                if spec["probe_bw_numel"]:
                    info["bw2"] = min(r["bw_concurrent"] for r in per_rank)
                row = summarize(cfg, per_rank, bw)
            except Exception as e:  # noqa: BLE001 - keep the row with the error
                row = {**cfg, "ok": False, "error": _first_line(e)}
            prev = best.get(cfg["key"])
            # keep the round with the lower median step time (other load on the machine only slows a round)
            if prev is None or not prev["ok"] or (row["ok"] and row["step_s"] < prev["step_s"]):
                best[cfg["key"]] = row
            status = f"{1e3 * row['step_s']:.1f} ms/step" if row["ok"] else f"ERROR {row['error']}"
            print(
                f"[bench.step] round {rnd + 1}/{args.rounds} {cfg['key']}: {status} "
                f"({time.perf_counter() - t0:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
    rows = [best[c["key"]] for c in configs]
    # bandwidth again at the end, the best of both (other load on the machine only lowers it)
    bw_end = copy_bandwidth(bw_numel)
    if bw_end > bw:
        info["bw"] = bw_end
        for r in rows:
            if r["ok"]:
                r["bound_s"] = r["bytes_per_param"] * r["shard_numel"] / bw_end
    return rows, info


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    # a rank's traceback: keep its last line (the exception), it names the cause
    return (text[-1] if text else type(e).__name__)[:300]


def _load_warning(rows: Sequence[dict[str, Any]], world: int) -> list[str]:
    """A warning paragraph when other processes competed for the CPUs during some configurations
    (the ranks themselves and their gloo threads account for a load of about world + 1)."""
    cores = os.cpu_count() or 1
    busy = [r for r in rows if r["ok"] and r["load"] > max(cores, world) + 1.5]
    if not busy:
        return []
    worst = max(r["load"] for r in busy)
    return [
        f"**Warning:** the 1-minute load average reached {worst:.1f} on {cores} cores during {len(busy)} of "
        f'{len(rows)} configurations (see "load avg" in the details): other processes competed for the CPUs, '
        "so those times are inflated and the ratios are not reliable. Rerun on an idle machine.",
        "",
    ]


def render(rows: Sequence[dict[str, Any]], info: dict[str, Any], command: str) -> str:
    s, m = info["sizes"], info["machine"]
    ok = [r for r in rows if r["ok"]]
    params = ok[0]["params"] if ok else 0
    ds = next((r for r in ok if r["kind"] == "deepspeed"), None)
    dist_rows = [r for r in ok if r["kind"] == "distopt"]
    diff = [r["key"] for r in dist_rows if r["comm_bytes"] != r["counted_bytes"]]
    cross = (
        "n/a"
        if not dist_rows
        else f"DIFFERENT for {', '.join(diff)}"
        if diff
        else f"equal for all {len(dist_rows)} dist-opt rows"
    )
    notes = NOTES.format(
        world=info["world"],
        rounds=info["rounds"],
        params=params,
        lr_adamw=LR["adamw"],
        lr_lars=LR["lars"],
        wd=WEIGHT_DECAY,
        bw=info["bw"] / 1e9,
        bw2=(info["bw2"] or float("nan")) / 1e9,
        crosscheck=cross,
        bw_mib=info["bw_numel"] * 4 // 2**20,
        ds_master=fmt_bytes(ds["extras"].get("master_partition_bytes")) if ds else "n/a",
        **s,
    )
    machine = ", ".join(f"{k} {v}" for k, v in m.items() if k != "date")
    out = [
        "# bench.step: optimizer step time, memory and traffic",
        "",
        f"Command: `{command}`  ",
        f"Date: {m['date']}  ",
        f"Machine: {machine}  ",
        f"World: {info['world']} ranks (gloo, CPU, OMP_NUM_THREADS=1); Ψ = {params:,} parameters; "
        f"{s['warmup']} warmup + {s['steps']} timed steps, best of {info['rounds']} round(s)",
        "",
        *_load_warning(rows, info["world"]),
        "## Results",
        "",
        render_table(rows),
        "",
        "## Targets",
        "",
        *(check_targets(rows) or ["- (no target configurations ran)"]),
        "",
        "## Where the update's time goes (torch.profiler, self CPU time, rank 0)",
        "",
        render_profiles(rows),
        "",
        "## Details",
        "",
        render_details(rows, info["bw2"]),
        "",
        "## Method",
        "",
        notes,
    ]
    if "ds_build_s" in info:
        out.append(
            f"DeepSpeed's CPU FusedAdam op was built/loaded before timing ({info['ds_build_s']:.0f} s)."
        )
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (smoke test)")
    p.add_argument(
        "--only", default="", help="comma-separated config keys: " + ", ".join(c["key"] for c in CONFIGS)
    )
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 3; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 15; quick 3)")
    p.add_argument("--world", type=int, default=2, help="ranks (default 2)")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="run every configuration this many times, keep the faster round (default 2; quick 1)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    p.add_argument(
        "--out",
        default=None,
        help="results file (default bench/results/step.md for a full run; quick runs only print "
        "unless given)",
    )
    return p


def run_cli(argv: Sequence[str] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Parse ``argv``, run the configurations, write the results file; returns (rows, info, markdown)."""
    args = build_parser().parse_args(argv)
    if (
        args.world < 1
        or (args.steps is not None and args.steps < 1)
        or (args.warmup is not None and args.warmup < 0)
        or (args.rounds is not None and args.rounds < 1)
    ):
        raise SystemExit("bench.step: --world, --steps and --rounds must be >= 1, --warmup >= 0")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m bench.step", *argv_list])
    rows, info = run(args)
    text = render(rows, info, command)
    out = args.out if args.out is not None else (None if args.quick else str(DEFAULT_OUT))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text, encoding="utf-8")
        print(f"[bench.step] wrote {out}", file=sys.stderr)
    return rows, info, text


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 when every configuration except DeepSpeed ran (DeepSpeed may be unavailable)."""
    rows, _, text = run_cli(argv)
    print(text)
    return 0 if all(r["ok"] for r in rows if r["kind"] != "deepspeed") else 1


if __name__ == "__main__":
    sys.exit(main())
