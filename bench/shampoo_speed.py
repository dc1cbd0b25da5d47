"""Shampoo step time: dist-opt vs Meta's DistributedShampoo vs DDP + AdamW(fused), in one run.

All runs: the 25.2M-parameter model of ``bench/common.py`` (12 residual blocks of Linear
512→2048→512), 2 gloo ranks × 1 thread, MSE on random data; step = forward + backward + optimizer
step (wall time, max over ranks). Shampoo settings are the same for both implementations:
max_preconditioner_dim 1024, betas (0.9, 1.0), eps 1e-12, Adam grafting (beta2 0.999, eps 1e-8),
decoupled weight decay 0.01, fp32 statistics and roots, precondition_frequency 100.

- dist-opt staggers root refreshes (``dist_opt/optim/shampoo/schedule.py``): after the first
  preconditioned step (all roots, once) each step of a 100-step period refreshes at most one
  1024-block here. It runs with start_preconditioning_step 3; the timed window follows it, and
  the amortized step is ``ordinary + (refresh step - ordinary) · (steps of a period with a
  refresh) / 100``.
- Meta's DistributedShampoo (DDPDistributedConfig, behind torch DDP) refreshes every root on
  the same step. It refuses start < frequency, so it is timed with frequency = start = 5 (same
  per-step work; refreshes on every 5th step) and amortized to 100: ``ordinary + (refresh step -
  ordinary) / 100``. Its source must be importable (``--meta-path``), otherwise it is skipped.
- A matmul probe (1024×1024 · 1024×512, fp32 and bf16) runs in every rank right before its timed
  window: the preconditioner work (statistics syrk m²n + n²m, preconditioning 2m²n + 2mn² per
  m×n block) is reported as the fraction of that rate it achieves.

    python bench/shampoo_speed.py --meta-path /path/to/optimizers   # ~5 min on 2 idle cores
    python bench/shampoo_speed.py --quick                            # smoke run, printed only

The results replace the "## Speed" section of bench/results/shampoo.md (the rest is kept).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import fmt_bytes, limit_threads, machine_info, make_25m_model, n_params, run_ranks  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "shampoo.md"
FREQ = 100
META_FREQ_ENV = "SHAMPOO_BENCH_META_FREQUENCY"  # set by --meta-frequency, read in the ranks


def meta_freq() -> int:
    """Meta's precondition_frequency (= its start step) in the timing run (default 5)."""
    return int(os.environ.get(META_FREQ_ENV, "5"))


HP = {"lr": 1e-4, "weight_decay": 0.01}


def probe(dtype_name: str, reps: int = 5) -> float:
    """GFLOP/s of one 1024×1024 · 1024×512 matmul on this core (median of ``reps``)."""
    import torch

    dt = getattr(torch, dtype_name)
    a, b = torch.randn(1024, 1024).to(dt), torch.randn(1024, 512).to(dt)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 1024 * 1024 * 512 / statistics.median(times) / 1e9


def block_flops(shapes: list[tuple[int, ...]]) -> tuple[float, float]:
    """(statistics, preconditioning) flops of one ordinary step over these blocks."""
    stats = sum(sum(d * d * (math_prod(s) // d) for d in s) for s in shapes)  # syrk: d²·(N/d) per mode
    pre = sum(2 * sum(d * math_prod(s) for d in s) for s in shapes)  # one d×d matmul per mode
    return float(stats), float(pre)


def math_prod(s: tuple[int, ...]) -> int:
    out = 1
    for d in s:
        out *= d
    return out


def _state_bytes(obj: Any, seen: set[int]) -> int:
    import torch

    if isinstance(obj, dict):
        return sum(_state_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v, seen) for v in obj)
    if torch.is_tensor(obj):
        t = obj.to_local() if hasattr(obj, "to_local") else obj
        if t.data_ptr() in seen or t.numel() == 0:
            return 0
        seen.add(t.data_ptr())
        return t.numel() * t.element_size()
    if hasattr(obj, "__dict__") and not isinstance(obj, type):  # e.g. Meta's per-block dataclasses
        return _state_bytes(vars(obj), seen)
    return 0


def _optimizer(which: str, model: Any, start: int) -> tuple[Any, Any]:
    """(module to call, optimizer) for one configuration."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    if which == "adamw":
        return DDP(model), torch.optim.AdamW(model.parameters(), fused=True, **HP)
    if which == "meta":
        from distributed_shampoo import AdamPreconditionerConfig, DDPDistributedConfig, DistributedShampoo

        opt = DistributedShampoo(
            model.parameters(),
            betas=(0.9, 1.0),
            epsilon=1e-12,
            max_preconditioner_dim=1024,
            precondition_frequency=meta_freq(),
            start_preconditioning_step=meta_freq(),
            grafting_config=AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8),
            distributed_config=DDPDistributedConfig(communication_dtype=torch.float32),
            **HP,
        )
        return DDP(model), opt
    from dist_opt.engine.sharded import ShardedOptimizer

    dtype = "bfloat16" if which == "distopt-bf16" else "float32"
    opt = ShardedOptimizer(
        model.named_parameters(),
        "shampoo",
        max_preconditioner_dim=1024,
        precondition_frequency=FREQ,
        start_preconditioning_step=start,
        preconditioner_dtype=dtype,
        **HP,
    )
    return model, opt


def time_rank(rank: int, world: int, which: str, batch: int, warmup: int, steps: int) -> dict:
    """Per-step wall times (and Shampoo's own timers) of one rank over the timed window."""
    limit_threads()
    import torch
    import torch.distributed as dist
    from torch import nn

    model = make_25m_model()
    g = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(batch, 512, generator=g), torch.randn(batch, 512, generator=g)
    net, opt = _optimizer(which, model, start=warmup)
    rec: dict[str, list] = {"wall": [], "cpu": [], "refresh": []}
    for step in range(1, warmup + steps + 1):
        if step == warmup + 1:
            rates = {"fp32": probe("float32"), "bf16": probe("bfloat16")}
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()
        if step <= warmup:
            continue
        rec["wall"].append(time.perf_counter() - t0)
        rec["cpu"].append(time.process_time() - c0)
        if which == "meta":
            rec["refresh"].append(step % meta_freq() == 0)
        st = getattr(opt, "last_stats", {})
        if which.startswith("distopt"):
            rec["refresh"].append(bool(st.get("shampoo/refresh", 0)))
            for k in ("blocks", "exchange", "statistics", "roots", "precondition"):
                rec.setdefault(k, []).append(st.get(f"time/shampoo_{k}_ms", 0.0))
    info: dict[str, Any] = {"params": n_params(model), "rates": rates, **rec}
    if which.startswith("distopt"):
        rule = opt.rule
        info["state_bytes"] = opt.state_bytes()
        info["flops"] = block_flops([b.block.shape for b in rule.owned if not b.diagonal])
        period = range(rule.start + 1, rule.start + rule.frequency + 1)
        info["refresh_fraction"] = sum(rule.refresh_due(t) for t in period) / rule.frequency
        info["max_refresh_blocks"] = max(len(rule.refreshing(t)) for t in period)
        info["matrix_blocks"] = sum(1 for b in rule.plan if not b.diagonal)
    else:
        info["state_bytes"] = _state_bytes(dict(opt.state), set())
        info["refresh_fraction"] = 1.0 / FREQ
    return info


def kernel_check(reps: int = 5) -> list[str]:
    """One 1024×512 block's ordinary-step matrix work through the rule's own functions vs the matmul
    probe, both in thread CPU time (robust to other processes on the cores), fp32 and bf16."""
    import torch

    from dist_opt.optim.shampoo import block_math
    from dist_opt.optim.shampoo.blocks import BlockState

    limit_threads()
    g = torch.randn(1024, 512)
    st_f, pre_f = block_flops([(1024, 512)])
    lines = ["| preconditioning dtype | statistics | preconditioning | matmul probe fp32 / bf16 | achieved |"]
    lines.append("|---|---|---|---|---|")
    for mm in (None, torch.bfloat16):
        st = BlockState(
            [torch.zeros(1024, 1024), torch.zeros(512, 512)], [None, None], None, None, 0, [1.0, 1.0]
        )
        block_math.accumulate(st, g, 1.0, torch.float32)
        block_math.refresh(st, 0.25, 1e-12, mm)
        cpu: dict[str, float] = {}

        def clock(name: str, fn: Any, cpu: dict[str, float] = cpu) -> None:
            fn()
            t = []
            for _ in range(reps):
                c0 = time.thread_time()
                fn()
                t.append(time.thread_time() - c0)
            cpu[name] = statistics.median(t)

        clock("stats", lambda st=st: block_math.accumulate(st, g, 1.0, torch.float32))
        clock("pre", lambda st=st: block_math.precondition(st, g, torch.float32))
        a32, b32 = torch.randn(1024, 1024), torch.randn(1024, 512)
        a16, b16 = a32.bfloat16(), b32.bfloat16()
        clock("p32", lambda a=a32, b=b32: a @ b)
        clock("p16", lambda a=a16, b=b16: a @ b)
        r32, r16 = 2 * 1024 * 1024 * 512 / cpu["p32"], 2 * 1024 * 1024 * 512 / cpu["p16"]
        ideal = st_f / r32 + pre_f / (r16 if mm else r32)
        lines.append(
            f"| {'bfloat16' if mm else 'float32'} | {cpu['stats'] * 1e3:.1f} ms ({st_f / cpu['stats'] / 1e9:.0f} "
            f"GFLOP/s) | {cpu['pre'] * 1e3:.1f} ms ({pre_f / cpu['pre'] / 1e9:.0f} GFLOP/s) | {r32 / 1e9:.0f} / "
            f"{r16 / 1e9:.0f} GFLOP/s | **{ideal / (cpu['stats'] + cpu['pre']):.0%}** |"
        )
    return lines


def summarize(ranks: list[dict], clock: str = "wall") -> dict:
    """Ordinary / refresh / worst / amortized step of one run by ``clock`` ("wall" or "cpu")."""
    n = len(ranks[0][clock])
    wall = [max(r[clock][i] for r in ranks) for i in range(n)]
    flags = [any(r["refresh"][i] for r in ranks) for i in range(n)] if ranks[0]["refresh"] else [False] * n
    normal = [w for w, f in zip(wall, flags, strict=True) if not f] or wall
    ref = [w for w, f in zip(wall, flags, strict=True) if f]
    out = {"mean": statistics.mean(wall), "normal": statistics.median(normal), "max": max(wall)}
    out["refresh"] = statistics.median(ref) if ref else None
    extra = (out["refresh"] - out["normal"]) if ref else 0.0
    out["amortized"] = out["normal"] + extra * ranks[0]["refresh_fraction"]
    return out


def run_all(quick: bool, only: list[str] | None = None) -> dict:
    """Time every configuration (``only``: just these keys, e.g. ["adamw@2048", "distopt@2048"])."""
    res: dict[str, Any] = {}
    s32, s2k = (4, 2) if quick else (20, 5)
    plan = [
        ("adamw@32", "adamw", 32, 3, s32),
        ("distopt@32", "distopt", 32, 3, s32),
        ("distopt-bf16@32", "distopt-bf16", 32, 3, s32),
        ("meta@32", "meta", 32, meta_freq(), 4 if quick else 10),
        ("adamw@2048", "adamw", 2048, 1, s2k),
        ("distopt@2048", "distopt", 2048, 3, s2k + 1),
        ("distopt-bf16@2048", "distopt-bf16", 2048, 3, s2k + 1),
    ]
    if only:
        plan = [p for p in plan if p[0] in only]
    elif quick:
        plan = [p for p in plan if p[2] == 32]
    for key, which, batch, warmup, steps in plan:
        if which == "meta":
            try:
                import distributed_shampoo  # noqa: F401
            except ImportError as e:
                print(f"skipping Meta's DistributedShampoo: {e}", file=sys.stderr)
                continue
        t0 = time.time()
        res[key] = run_ranks(time_rank, 2, (which, batch, warmup, steps), timeout_s=1800)
        print(f"{key}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return res


def report(res: dict, load: tuple[float, float], wall_s: float, cmd: str) -> list[str]:
    info = machine_info()
    ms = lambda s: f"{s * 1e3:.0f} ms"  # noqa: E731
    sums = {k: summarize(v) for k, v in res.items()}
    cpus = {k: summarize(v, "cpu") for k, v in res.items()}
    lines = [
        "## Speed",
        "",
        f"Command: `{cmd}` ({wall_s:.0f} s). Machine: {info['cpu']}, {info['cores']} cores; torch "
        f"{info['torch']}; {info['date']}. 1-minute load average at start / end: {load[0]:.1f} / "
        f"{load[1]:.1f}" + (" — **LOADED machine, timings inflated**." if max(load) > 1.5 else "."),
        "",
        f"{res[next(iter(res))][0]['params']:,} parameters, 2 gloo ranks × 1 thread; see "
        "`bench/shampoo_speed.py` for how each column is obtained (wall time per step, max over ranks; "
        "medians of ordinary and of refresh steps).",
        "",
        "| run | batch/rank | ordinary step | refresh step | worst step | amortized (f=100) | amortized CPU "
        "time | state/rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, s in sums.items():
        name, batch = k.split("@")
        r = res[k][0]
        lines.append(
            f"| {name} | {batch} | {ms(s['normal'])} | {ms(s['refresh']) if s['refresh'] else '—'} | "
            f"{ms(s['max'])} | **{ms(s['amortized'])}** | {ms(cpus[k]['amortized'])} | {fmt_bytes(max(x['state_bytes'] for x in res[k]))} "
            f"({r['state_bytes']:,} B) |"
        )
    lines.append("")
    for label, table in (("wall", sums), ("CPU time (robust to load)", cpus)):
        ratios = []
        for b in ("32", "2048"):
            base, meta = table.get(f"adamw@{b}"), table.get(f"meta@{b}")
            for v in ("distopt", "distopt-bf16"):
                s = table.get(f"{v}@{b}")
                if s is None:
                    continue
                part = f"{v} at batch {b}: " + (
                    f"{s['amortized'] / base['amortized']:.2f}× DDP+AdamW" if base else ""
                )
                if meta:
                    part += f", **{s['amortized'] / meta['amortized']:.2f}× Meta**"
                ratios.append(part)
        lines += [f"Ratios of amortized steps by {label}: " + "; ".join(ratios) + ".", ""]
    lines += [
        "Where dist-opt's Shampoo time goes (per rank per step, median over the window; preconditioner "
        "work vs the matmul probe run in the same process):",
        "",
        "| run | rank | statistics | roots (refresh steps) | preconditioning | all-gather + unpack | "
        "probe fp32 / bf16 | achieved vs probe |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in (k for k in res if k.startswith("distopt")):
        for i, r in enumerate(res[k]):
            med = {p: statistics.median(r[p]) for p in ("statistics", "precondition", "exchange")}
            roots = [x for x, f in zip(r["roots"], r["refresh"], strict=True) if f]
            st_f, pre_f = r["flops"]
            pre_rate = r["rates"]["bf16" if "bf16" in k else "fp32"]
            ideal = st_f / r["rates"]["fp32"] / 1e6 + pre_f / pre_rate / 1e6  # ms
            frac = ideal / (med["statistics"] + med["precondition"])
            lines.append(
                f"| {k} | {i} | {med['statistics']:.0f} ms ({st_f / 1e9:.1f} GFLOP) | "
                f"{statistics.median(roots) if roots else 0:.0f} ms | {med['precondition']:.0f} ms "
                f"({pre_f / 1e9:.1f} GFLOP) | {med['exchange']:.0f} ms | {r['rates']['fp32']:.0f} / "
                f"{r['rates']['bf16']:.0f} GFLOP/s | **{frac:.0%}** |"
            )
    d = next((res[k][0] for k in res if k.startswith("distopt")), None)
    if d is not None:
        lines += [
            "",
            f"Refresh schedule: {d['matrix_blocks']} matrix blocks, at most {d['max_refresh_blocks']} "
            f"refreshing on any step after the first preconditioned one; {d['refresh_fraction']:.0%} of "
            "the steps of a period refresh something (Meta: every root on one step per period).",
        ]
    return lines + [""]


def write_section(lines: list[str], path: Path) -> None:
    """Replace (or append) the section of the results file whose heading is ``lines[0]``."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Distributed Shampoo vs AdamW\n"
    head, sep, tail = old.partition(lines[0] + "\n")
    rest = ""
    if sep:
        nxt = tail.find("\n## ")
        rest = tail[nxt + 1 :] if nxt >= 0 else ""
    text = head.rstrip("\n") + "\n\n" + "\n".join(lines) + ("\n" + rest if rest else "")
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 32 only, few steps, printed only")
    ap.add_argument("--only", help="comma-separated run keys, e.g. adamw@2048,distopt@2048 (printed only)")
    ap.add_argument("--kernel", action="store_true", help="only the one-block CPU-time kernel check")
    ap.add_argument("--meta-frequency", type=int, default=5, help="Meta's frequency = start step while timed")
    ap.add_argument("--meta-path", help="directory holding Meta's distributed_shampoo package")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.meta_path:
        sys.path.insert(0, args.meta_path)
        os.environ["PYTHONPATH"] = os.pathsep.join([args.meta_path, os.environ.get("PYTHONPATH", "")])
    os.environ[META_FREQ_ENV] = str(args.meta_frequency)
    if args.kernel:
        print("\n".join(kernel_check()))
        return 0
    limit_threads()
    cmd = "python bench/shampoo_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0, load0 = time.time(), os.getloadavg()[0]
    only = args.only.split(",") if args.only else None
    res = run_all(args.quick, only)
    lines = report(res, (load0, os.getloadavg()[0]), time.time() - t0, cmd.strip())
    print("\n".join(lines))
    if not (args.quick or only):
        write_section(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
