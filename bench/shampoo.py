"""Distributed Shampoo vs AdamW: steps to a target, and the cost of a step.

1. Steps to target (one process; the math is the same at any world size, see tests/test_shampoo.py),
   3 seeds, a small lr grid per optimizer, both through the same sharded engine:
   - rotated ill-conditioned linear regression (task ``synthetic``, kind regression, dim 32, noise
     0.1, condition numbers 1e3 and 1e4, 64 fresh samples per step): held-out MSE <= 0.02;
   - ``digits`` (MLP 64-64-64-10, batch 64): held-out cross-entropy <= 0.10.
2. Step time on the 25M model of ``bench/common.py`` (12 blocks of Linear 512→2048→512 +
   LayerNorm, batch 32 per rank) on 2 gloo ranks (one thread each): Shampoo
   (max_preconditioner_dim 1024, precondition_frequency 100) on the sharded engine vs
   DDP + torch.optim.AdamW(foreach=True), run in the same invocation (AdamW before and after
   Shampoo, to expose load drift). Refresh steps and ordinary steps are timed separately and
   the amortized step time for frequency 100 is (99·ordinary + refresh)/100.

    python bench/shampoo.py                 # everything (~10 min on 2 cores) -> bench/results/shampoo.md
    python bench/shampoo.py --quick         # a smoke run (fewer seeds/steps), printed only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import fmt_bytes, limit_threads, machine_info, make_25m_model, n_params, run_ranks  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "shampoo.md"

REGRESSION = {
    "target": 0.02,
    "max_steps": 2500,
    "every": 5,
    "batch": 64,
    "lrs": {"adamw": [0.03, 0.1, 0.3, 1.0], "shampoo": [0.3, 1.0, 3.0]},
}
DIGITS = {
    "target": 0.10,
    "max_steps": 1500,
    "every": 10,
    "batch": 64,
    "lrs": {"adamw": [1e-3, 3e-3, 1e-2, 3e-2], "shampoo": [1e-3, 3e-3, 1e-2, 3e-2]},
}
SHAMPOO_HP = {"regression": {"precondition_frequency": 10}, "digits": {"precondition_frequency": 20}}


# -- steps to target -------------------------------------------------------------------------------
def steps_to_target(
    task_kind: str,
    name: str,
    lr: float,
    seed: int,
    kappa: float = 1.0,
    max_steps: int | None = None,
    extra_hp: dict | None = None,
) -> int | None:
    """Optimizer steps until the held-out loss first reaches the target (checked every few steps)."""
    import torch

    from dist_opt.config.schema import TaskConfig
    from dist_opt.engine.sharded import ShardedOptimizer
    from dist_opt.tasks import build_task

    spec = REGRESSION if task_kind == "regression" else DIGITS
    max_steps = max_steps or spec["max_steps"]
    if task_kind == "regression":
        cfg = TaskConfig(name="synthetic", kind="regression", dim=32, noise=0.1, condition_number=kappa)
    else:
        cfg = TaskConfig(name="digits")
    task = build_task(cfg, seed)
    model = task.build_model()
    hp = {**SHAMPOO_HP[task_kind], **(extra_hp or {})} if name == "shampoo" else {}
    opt = ShardedOptimizer(model.named_parameters(), name, lr=lr, weight_decay=0.0, **hp)
    ev = task.eval_batch(torch.arange(min(task.eval_size, 2048)))
    g = torch.Generator().manual_seed(seed)
    b = spec["batch"]
    perm, pos = None, 0
    for step in range(1, max_steps + 1):
        if task.train_size is None:  # fresh samples every step
            idx = torch.arange((step - 1) * b, step * b)
        else:  # epochs of a seeded permutation
            if perm is None or pos + b > len(perm):
                perm, pos = torch.randperm(task.train_size, generator=g), 0
            idx, pos = perm[pos : pos + b], pos + b
        task.loss(model, task.train_batch(idx)).backward()
        opt.step()
        opt.zero_grad()
        if step % spec["every"] == 0:
            sums = task.eval_sums(model, ev)
            loss = sums["loss_sum"] / sums["count"]
            if loss != loss or loss > 1e6:  # diverged
                return None
            if loss <= spec["target"]:
                return step
    return None


def grid(task_kind: str, seeds: list[int], kappa: float = 1.0, max_steps: int | None = None) -> dict:
    """{optimizer: {lr: [steps or None per seed]}}."""
    spec = REGRESSION if task_kind == "regression" else DIGITS
    out: dict = {}
    for name, lrs in spec["lrs"].items():
        out[name] = {
            lr: [steps_to_target(task_kind, name, lr, s, kappa, max_steps) for s in seeds] for lr in lrs
        }
    return out


def best(per_lr: dict) -> tuple[float, list]:
    """The lr with the smallest mean steps over seeds (a miss counts as infinity)."""

    def score(v: list) -> float:
        return sum(float("inf") if s is None else s for s in v) / len(v)

    lr = min(per_lr, key=lambda k: (score(per_lr[k]), k))
    return lr, per_lr[lr]


def fmt_steps(v: list) -> str:
    return ", ".join("—" if s is None else str(s) for s in v)


def target_table(title: str, res: dict, max_steps: int) -> list[str]:
    lines = [
        f"**{title}** (steps per seed; — = not reached within {max_steps} steps)",
        "",
        "| optimizer | lr | steps (seeds) | mean |",
        "|---|---|---|---|",
    ]
    for name, per_lr in res.items():
        blr, _ = best(per_lr)
        for lr, v in per_lr.items():
            mean = "—" if any(s is None for s in v) else f"{statistics.mean(v):.0f}"
            mark = " **(best)**" if lr == blr else ""
            lines.append(f"| {name} | {lr:g}{mark} | {fmt_steps(v)} | {mean} |")
    (alr, av), (slr, sv) = best(res["adamw"]), best(res["shampoo"])
    if not any(s is None for s in av + sv):
        ratio = statistics.mean(av) / statistics.mean(sv)
        lines += [
            "",
            f"Tuned: AdamW {statistics.mean(av):.0f} steps (lr {alr:g}) vs Shampoo "
            f"{statistics.mean(sv):.0f} steps (lr {slr:g}): **{ratio:.1f}× fewer steps** with Shampoo.",
        ]
    return lines + [""]


def dtype_study(seeds: list[int], quick: bool = False) -> list[str]:
    """Steps to target of Shampoo with float32 vs bfloat16 preconditioning matmuls, same lr grids."""
    lines = [
        "## bfloat16 preconditioning: steps to target",
        "",
        "`preconditioner_dtype: bfloat16` keeps statistics and roots in float32 and runs the "
        "preconditioning products in bfloat16; everything else as above (Shampoo's lr grid, 3 seeds). "
        "Steps are independent of machine load.",
        "",
        "| problem | dtype | best lr | steps (seeds) | mean |",
        "|---|---|---|---|---|",
    ]
    cases = [("regression", 1e3), ("regression", 1e4), ("digits", 1.0)]
    for kind, kappa in cases[:1] if quick else cases:
        spec = REGRESSION if kind == "regression" else DIGITS
        max_steps = 300 if quick else spec["max_steps"]
        title = f"regression κ={kappa:.0e}" if kind == "regression" else "digits"
        for dtype in ("float32", "bfloat16"):
            per_lr = {
                lr: [
                    steps_to_target(kind, "shampoo", lr, s, kappa, max_steps, {"preconditioner_dtype": dtype})
                    for s in seeds
                ]
                for lr in spec["lrs"]["shampoo"]
            }
            lr, v = best(per_lr)
            mean = "—" if any(x is None for x in v) else f"{statistics.mean(v):.0f}"
            lines.append(f"| {title} | {dtype} | {lr:g} | {fmt_steps(v)} | {mean} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines + [""]


# -- step time on the 25M model ------------------------------------------------------------------------
def time_rank(rank: int, world: int, which: str, warmup: int, steps: int, frequency: int) -> dict:
    """Per-step wall and CPU times of one rank (the caller takes the max over ranks per step)."""
    limit_threads()
    import torch
    import torch.distributed as dist
    from torch import nn

    model = make_25m_model()
    g = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(32, 512, generator=g), torch.randn(32, 512, generator=g)
    info: dict = {"params": n_params(model)}
    if which == "adamw":
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, foreach=True)
    else:
        from dist_opt.engine.sharded import ShardedOptimizer

        net = model
        opt = ShardedOptimizer(
            model.named_parameters(),
            "shampoo",
            lr=1e-4,
            weight_decay=0.01,
            max_preconditioner_dim=1024,
            precondition_frequency=frequency,
        )
    wall, cpu, refresh, blocks_ms, exch_ms = [], [], [], [], []
    dist.barrier()
    for step in range(1, warmup + steps + 1):
        if step == warmup + 1:
            dist.barrier()
            if which != "adamw":
                opt.comm.ledger.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step > warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            st = getattr(opt, "last_stats", {})
            refresh.append(bool(st.get("shampoo/refresh", 0)))
            blocks_ms.append(st.get("time/shampoo_blocks_ms", 0.0))
            exch_ms.append(st.get("time/shampoo_exchange_ms", 0.0))
    info.update(wall=wall, cpu=cpu, refresh=refresh, blocks_ms=blocks_ms, exchange_ms=exch_ms)
    if which == "adamw":
        info["state_bytes"] = sum(
            t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
        )
    else:
        rule = opt.rule
        info["state_bytes"] = rule.state_bytes()
        info["precond_bytes"] = rule.preconditioner_bytes()
        info["owned"] = len(rule.owned)
        info["owned_matrix"] = sum(1 for b in rule.owned if not b.diagonal)
        info["comm_bytes_per_step"] = {k: v / steps for k, v in opt.comm.ledger.bytes.items()}
        info["failures"] = opt.last_stats.get("shampoo/root_failures")
    return info


def summarize(per_rank: list[dict], frequency_for: int = 100) -> dict:
    steps = len(per_rank[0]["wall"])
    wall = [max(r["wall"][i] for r in per_rank) for i in range(steps)]
    cpu = [max(r["cpu"][i] for r in per_rank) for i in range(steps)]
    refresh = per_rank[0]["refresh"]
    normal = [w for w, f in zip(wall, refresh, strict=True) if not f]
    ref = [w for w, f in zip(wall, refresh, strict=True) if f]
    cpu_normal = [c for c, f in zip(cpu, refresh, strict=True) if not f]
    cpu_ref = [c for c, f in zip(cpu, refresh, strict=True) if f]
    out = {
        "steps": steps,
        "mean": statistics.mean(wall),
        "median": statistics.median(wall),
        "cpu_mean": statistics.mean(cpu),
        "normal": statistics.mean(normal) if normal else None,
        "normal_median": statistics.median(normal) if normal else None,
        "refresh": statistics.mean(ref) if ref else None,
        "n_refresh": len(ref),
    }
    if ref and normal:
        out["amortized"] = out["normal"] + (out["refresh"] - out["normal"]) / frequency_for
        cn, cr = statistics.mean(cpu_normal), statistics.mean(cpu_ref)
        out["cpu_refresh"] = cr
        out["cpu_amortized"] = cn + (cr - cn) / frequency_for
    return out


def timing(steps: int, warmup: int, frequency: int) -> dict:
    res = {}
    res["adamw_1"] = run_ranks(time_rank, 2, ("adamw", warmup, steps, frequency), timeout_s=1800)
    res["shampoo"] = run_ranks(time_rank, 2, ("shampoo", warmup, steps, frequency), timeout_s=3600)
    res["adamw_2"] = run_ranks(time_rank, 2, ("adamw", warmup, steps, frequency), timeout_s=1800)
    return res


def timing_lines(res: dict, steps: int, warmup: int, frequency: int) -> list[str]:
    a1, a2, sh = summarize(res["adamw_1"]), summarize(res["adamw_2"]), summarize(res["shampoo"])
    adamw = (a1["mean"] + a2["mean"]) / 2
    s_amort = sh.get("amortized", sh["mean"])
    ranks = res["shampoo"]
    lines = [
        f"25M model ({ranks[0]['params']:,} parameters), 2 gloo ranks × 1 thread, batch 32 per rank, "
        f"{warmup} warm-up + {steps} timed steps each; step = forward + backward + optimizer step "
        "(wall time, max over ranks).",
        "",
        "| run | mean step | median | CPU time/step | refresh steps in window |",
        "|---|---|---|---|---|",
        f"| DDP + AdamW(foreach), before | {a1['mean'] * 1e3:.0f} ms | {a1['median'] * 1e3:.0f} ms | "
        f"{a1['cpu_mean'] * 1e3:.0f} ms | — |",
        f"| Shampoo, all steps (frequency {frequency}) | {sh['mean'] * 1e3:.0f} ms | {sh['median'] * 1e3:.0f} ms | "
        f"{sh['cpu_mean'] * 1e3:.0f} ms | {sh['n_refresh']} |",
        f"| DDP + AdamW(foreach), after | {a2['mean'] * 1e3:.0f} ms | {a2['median'] * 1e3:.0f} ms | "
        f"{a2['cpu_mean'] * 1e3:.0f} ms | — |",
        "",
    ]
    if sh.get("refresh") is not None:
        lines += [
            f"Shampoo ordinary step {sh['normal'] * 1e3:.0f} ms (median {sh['normal_median'] * 1e3:.0f} ms), "
            f"refresh step {sh['refresh'] * 1e3:.0f} ms → amortized for precondition_frequency=100: "
            f"**{s_amort * 1e3:.0f} ms = {s_amort / adamw:.2f}× DDP+AdamW** ({adamw * 1e3:.0f} ms, mean of "
            "both AdamW runs). Target ≤ 1.5×.",
            "",
            f"By CPU time (insensitive to other processes on the cores, blind to waiting for peers): "
            f"Shampoo amortized {sh['cpu_amortized'] * 1e3:.0f} ms (refresh step {sh['cpu_refresh'] * 1e3:.0f} ms) "
            f"vs AdamW {(a1['cpu_mean'] + a2['cpu_mean']) / 2 * 1e3:.0f} ms: "
            f"**{sh['cpu_amortized'] / ((a1['cpu_mean'] + a2['cpu_mean']) / 2):.2f}×**.",
            "",
        ]
    blocks = [statistics.mean(r["blocks_ms"]) for r in ranks]
    exch = [statistics.mean(r["exchange_ms"]) for r in ranks]
    lines += [
        "| rank | blocks owned (matrix) | Shampoo state | preconditioners (stats+roots) | block compute/step | "
        "all-gather + unpack/step |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(ranks):
        lines.append(
            f"| {i} | {r['owned']} ({r['owned_matrix']}) | {fmt_bytes(r['state_bytes'])} | "
            f"{fmt_bytes(r['precond_bytes'])} | {blocks[i]:.0f} ms | {exch[i]:.0f} ms |"
        )
    total_pre = sum(r["precond_bytes"] for r in ranks)
    comm = ranks[0]["comm_bytes_per_step"]
    shares = ", ".join(f"{r['precond_bytes'] / total_pre:.1%}" for r in ranks)
    lines += [
        "",
        f"Preconditioner memory: {fmt_bytes(total_pre)} in total, {shares} per rank (1/N = 50%). "
        f"AdamW state per rank (replicated): {fmt_bytes(res['adamw_1'][0]['state_bytes'])}. "
        f"Root failures: {ranks[0]['failures']}.",
        "",
        "Traffic per rank per Shampoo step (ring-algorithm volume): "
        + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(comm.items()))
        + ".",
        "",
    ]
    return lines


def analysis_lines() -> list[str]:
    """Why the step costs what it does (arithmetic from the model's shapes, no measurement)."""
    m, n, batch = 1024, 512, 32
    stats = m * n * (m + n)  # two syrk: m²n + n²m flops (half of 2·m·n·(m+n))
    precond = 2 * m * n * (m + n)  # L^{-1/4}·M (2m²n) and ·R^{-1/4} (2mn²)
    per_param = (stats + precond) / (m * n)
    return [
        "Where the time goes: every 1024×512 block costs, per step, "
        f"{(stats + precond) / 1e9:.1f} GFLOP ({stats / 1e9:.1f} for the two statistics via BLAS syrk, "
        f"{precond / 1e9:.1f} for L^-1/4·M·R^-1/4) — {per_param:.0f} flops per parameter, against "
        f"6·{batch} = {6 * batch} for forward + backward at batch {batch}. Split over 2 ranks that is still "
        f"~{per_param / 2 / (6 * batch):.0f}× the forward/backward arithmetic, so at this batch size Shampoo's "
        "per-step matrix products, not communication, set the ratio; it shrinks as the per-rank batch grows "
        "or with more ranks (the block work is divided by N, the forward/backward is not). Root refreshes "
        "(eigendecompositions) add ~1/100 of a refresh step per step.",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, short runs, no results file")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200, help="timed steps per run on the 25M model")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--frequency", type=int, default=100, help="precondition_frequency in the timing run")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-targets", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--dtype-study",
        action="store_true",
        help="only the float32 vs bfloat16 steps-to-target study (replaces its section of the results)",
    )
    args = ap.parse_args(argv)
    if args.dtype_study:
        from bench.shampoo_speed import write_section

        lines = dtype_study(list(range(1 if args.quick else args.seeds)), args.quick)
        print("\n".join(lines))
        if not args.quick:
            write_section(lines, args.out)
        return 0
    limit_threads()
    seeds = list(range(1 if args.quick else args.seeds))
    steps, warmup, freq = (12, 2, 5) if args.quick else (args.steps, args.warmup, args.frequency)
    started = time.time()
    lines = ["# Distributed Shampoo vs AdamW", ""]
    cmd = "python bench/shampoo.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    lines += [f"Command: `{cmd.strip()}`", ""]
    info = machine_info()
    lines += [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']}; {info['os']}; Python "
        f"{info['python']}, torch {info['torch']}; {info['date']}.",
        "",
    ]
    if not args.skip_targets:
        lines += [
            "## Steps to target",
            "",
            "Same engine for both; weight decay 0; Shampoo defaults (betas (0.9, 1.0), Adam grafting, "
            "eps 1e-12, max_preconditioner_dim 1024) with precondition_frequency 10 (regression) / 20 "
            "(digits). The regression weight (1×32) merges to one 32-vector with a full 32×32 "
            "preconditioner (exponent −1/2); digits' 64×64 layers are 2-D blocks, the 10×64 output "
            "layer merges to a 640-vector.",
            "",
        ]
        for kappa in (1e3, 1e4):
            max_steps = 200 if args.quick else None
            t0 = time.time()
            res = grid("regression", seeds, kappa, max_steps)
            lines += target_table(
                f"Regression, condition number {kappa:.0e}, target held-out MSE ≤ "
                f"{REGRESSION['target']} (noise floor 0.01)",
                res,
                max_steps or REGRESSION["max_steps"],
            )
            print(f"regression κ={kappa:g}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        t0 = time.time()
        max_steps = 300 if args.quick else None
        res = grid("digits", seeds, max_steps=max_steps)
        lines += target_table(
            f"Digits, target held-out cross-entropy ≤ {DIGITS['target']}",
            res,
            max_steps or DIGITS["max_steps"],
        )
        print(f"digits: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    if not args.skip_timing:
        t0 = time.time()
        load0 = os.getloadavg()[0]
        res = timing(steps, warmup, freq)
        load1 = os.getloadavg()[0]
        lines += ["## Step time, 25M model, 2 ranks", ""] + timing_lines(res, steps, warmup, freq)
        lines += analysis_lines()
        lines += [
            f"1-minute load average at the start / end of the timing runs: {load0:.1f} / {load1:.1f} "
            f"({os.cpu_count()} cores; above ~2 other processes shared the cores and wall times are inflated "
            "— compare the CPU-time column).",
            "",
        ]
        print(f"timing: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    lines += [f"Total benchmark time: {time.time() - started:.0f} s.", ""]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
