"""``dist-opt plan RUN_DIR``: batch size and GPU count from a probe run's noise scale and timings."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dist_opt.plan.fabric import CostModel, CostModelError, load_cost_model
from dist_opt.plan.planner import Candidate, candidates, default_batches, recommend, reference
from dist_opt.plan.probe import B_NOISE_KEY, PlanError, Probe, read_probe
from dist_opt.plan.step_model import MODES, Workload

COLUMNS = ("batch", "GPUs", "nodes", "batch/GPU", "steps ×", "step ms", "comm %", "time ×", "cost ×")


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return out


def _number(text: str, integer: bool) -> float:
    """``text`` as a number >= 1 (an integer when ``integer``); NaN and junk are refused."""
    try:
        x: float = int(text) if integer else float(text)
    except ValueError:
        x = 0
    if not x >= 1:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if integer else 'a number'} >= 1, got {text!r}"
        )
    return x


def _positive_int(text: str) -> int:
    return int(_number(text, integer=True))


def _at_least_one(text: str) -> float:
    return _number(text, integer=False)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dist-opt plan",
        description="Predict steps, step time, time and GPU-hours to target for candidate global batches "
        "and GPU counts from a probe run (its noise/b_simple and timings) and an α-β cost model.",
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", help="the probe run's directory (metrics.jsonl, config.yaml)"
    )
    p.add_argument("--gpus", type=_ints, default=[8, 64, 512], help="GPU counts (default 8,64,512)")
    p.add_argument("--batches", type=_ints, default=None, help="global batches (default B0·2^k, k=-2..8)")
    p.add_argument("--cost-model", metavar="FILE", help="YAML overriding the interconnect and model settings")
    p.add_argument(
        "--mode", choices=MODES, help="data-parallel mode to predict (default: the run's zero_stage)"
    )
    p.add_argument(
        "--params", type=_positive_int, help="parameter count (default: from the run's final_params.pt)"
    )
    p.add_argument(
        "--max-cost", type=_at_least_one, default=2.0, help="recommend the fastest within this × the cheapest"
    )
    p.add_argument("--plot", metavar="PNG", help="also plot time to target vs batch per GPU count")
    return p


def _header(pr: Probe, cm: CostModel, mode: str, ref: Candidate) -> list[str]:
    first, last, k, n = pr.b_noise_steps
    upd = (
        f"update {pr.update_s_per_param * 1e9:.3g} ns/parameter"
        if pr.update_s_per_param is not None
        else "update cost not logged (taken as 0)"
    )
    return [
        f"probe: {pr.run_dir} ({pr.engine} engine, zero_stage {pr.zero_stage}, {pr.world} ranks, "
        f"global batch B0={pr.global_batch}, {pr.params:,} parameters)",
        f"B_noise = {pr.b_noise:.4g} (median {B_NOISE_KEY} over steps {first}-{last}: the last {k} of {n} "
        f"logged values)",
        f"probe timings (median over steps {pr.timing_steps[0]}-{pr.timing_steps[1]}): forward+backward "
        f"{pr.sample_s * 1e3:.3g} ms/sample on a rank, {upd}, step {pr.step_ms:.4g} ms",
        f"cost model: {cm.describe()}; mode {mode}",
        f"× columns relative to batch {ref.batch} on {ref.gpus} GPUs; steps × = S(B)/S(B0) = "
        f"(1 + B_noise/B)/(1 + B_noise/B0)",
    ]


def table(rows: Sequence[Candidate], best: Candidate) -> list[str]:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        mark = " ★" if r is best else ""
        out.append(
            f"| {r.batch}{mark} | {r.gpus} | {r.nodes} | {r.batch // r.gpus} | {r.rel_steps:.3f} | "
            f"{r.step.total_s * 1e3:.4g} | {100 * r.step.comm_share:.1f} | {r.rel_time:.3g} | "
            f"{r.rel_cost:.3g} |"
        )
    return out


def plot(rows: Sequence[Candidate], best: Candidate, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for g in sorted({r.gpus for r in rows}):
        pts = [r for r in rows if r.gpus == g]
        ax.plot([r.batch for r in pts], [r.rel_time for r in pts], "o-", label=f"{g} GPUs")
    ax.plot([best.batch], [best.rel_time], "k*", ms=14, label="recommended")
    ax.set(xscale="log", yscale="log", xlabel="global batch", ylabel="time to target (relative)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cm = load_cost_model(args.cost_model) if args.cost_model else CostModel()
        pr = read_probe(args.run_dir, params=args.params)
        for g in args.gpus:
            if g > cm.gpus_per_node and g % cm.gpus_per_node:
                raise PlanError(f"--gpus {g}: not a multiple of gpus_per_node={cm.gpus_per_node}")
    except (CostModelError, PlanError) as e:
        print(f"dist-opt plan: {e}", file=sys.stderr)
        return 2
    mode = args.mode or pr.mode
    work = Workload(
        params=pr.params,
        sample_s=pr.sample_s,
        update_s_per_param=pr.update_s_per_param or 0.0,
        grad_bytes=cm.grad_bytes or pr.grad_bytes,
        param_bytes=cm.param_bytes or pr.param_bytes,
    )
    batches = args.batches or default_batches(pr.global_batch)
    rows = candidates(work, mode, pr.global_batch, pr.b_noise, batches, args.gpus, cm)
    if not rows:
        print(
            "dist-opt plan: no candidate has a batch >= its GPU count (a whole number per GPU)",
            file=sys.stderr,
        )
        return 2
    best = recommend(rows, args.max_cost)
    print("\n".join([*_header(pr, cm, mode, reference(rows)), "", *table(rows, best), ""]))
    print(
        f"recommended (★): batch {best.batch} on {best.gpus} GPUs ({best.nodes} node(s)): time to target "
        f"{best.rel_time:.3g}×, cost {best.rel_cost:.3g}× (the fastest within {args.max_cost:g}× the cheapest cost)"
    )
    if args.plot:
        plot(rows, best, args.plot)
        print(f"plot: {Path(args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
