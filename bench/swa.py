"""SWA vs. an SGD-momentum baseline on ``digits`` (clean and 20% label noise), paired seeds.

    python bench/swa.py                      # tune on seeds 100-104, report seeds 0-9 -> bench/results/swa.md
    python bench/swa.py --seeds 5 --dev-seeds 3 --out /tmp/swa.md
    python bench/swa.py --no-tune --lr 0.05 --swa-lr 0.05

Arms (same model init, data order and label noise per seed; BatchNorm MLP 64-64-64-10, batch 32,
momentum 0.9, weight decay 5e-4):

- ``sgd``: cosine decay of the lr to 0 over ``--epochs`` epochs (the baseline).
- ``swa 1x``: constant lr, then from epoch ``0.75 * epochs`` SWALR (cos, ``--anneal`` epochs) to
  ``swa.lr`` and an average at every epoch end; ``--epochs`` epochs in all (equal budget).
- ``swa 1.5x``: the same SWA run continued to ``1.5 * epochs`` epochs (SWA starts at the same epoch).

Protocol: for each data variant, the lr of ``sgd`` and the (lr, swa.lr) of SWA are each picked by
the lowest mean test NLL on separate development seeds (``--dev-seeds`` from 100); the ``swa 1.5x``
arm reuses the SWA pick. The report is on seeds ``0..--seeds-1``, never used for the pick: accuracy
and NLL (mean cross-entropy) on the 360 held-out digits of the final weights (the BatchNorm-refreshed
SWA average for the SWA arms; their last iterate is listed too), mean ± standard error, the paired
difference to ``sgd`` and on how many seeds SWA was better. Runs are in-process worlds of one
(``Trainer``), ``--jobs`` at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"digits": [], "digits, 20% label noise": ["task.label_noise=0.2"]}
COMMON = [
    "task.name=digits",
    "task.batchnorm=true",
    "task.hidden=64",
    "data.global_batch=32",
    "data.micro_batch=32",
    "optimizer.name=momentum",
    "optimizer.momentum=0.9",
    "optimizer.weight_decay=5e-4",
    "train.steps=null",
    "train.progress=false",
    "train.log_every=1000000",
    "tracking.wandb.mode=disabled",
    "tracking.noise_scale=false",
    "checkpoint.at_end=false",
    "distributed.nproc=1",
]
GRID_LR = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
GRID_SWA_LR = (0.01, 0.02, 0.05, 0.1, 0.2)
DEV_SEED0 = 100


@dataclass(frozen=True)
class Arm:
    name: str
    budget: float  # multiple of --epochs
    swa: bool


ARMS = (Arm("sgd", 1.0, False), Arm("swa 1x", 1.0, True), Arm("swa 1.5x", 1.5, True))


def overrides(
    arm: Arm,
    epochs_1x: int,
    anneal: int,
    lr: float,
    swa_lr: float | None,
    variant: list[str],
    seed: int,
    out_dir: str,
) -> list[str]:
    ov = [
        *COMMON,
        *variant,
        f"run.seed={seed}",
        f"run.out_dir={out_dir}",
        f"train.epochs={round(epochs_1x * arm.budget)}",
        f"optimizer.lr={lr}",
    ]
    if not arm.swa:
        return [*ov, "schedule.name=cosine"]
    return [
        *ov,
        "schedule.name=constant",
        "swa.enabled=true",
        f"swa.start_epoch={round(0.75 * epochs_1x)}",
        f"swa.lr={swa_lr}",
        f"swa.anneal_epochs={anneal}",
        "swa.anneal_strategy=cos",
    ]


def _init_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    from dist_opt.dist.env import detect
    from dist_opt.dist.group import init_process_group

    init_process_group(detect({}), "gloo", 600)


def _run(ov: list[str]) -> dict[str, float]:
    from dist_opt.config import load_config
    from dist_opt.train import Trainer

    cfg = load_config(None, ov)
    Trainer(cfg, torch.device("cpu")).fit()
    return json.loads((Path(cfg.run.out_dir) / "summary.json").read_text())


def final(summary: dict[str, float], swa: bool) -> tuple[float, float]:
    """(accuracy, NLL) of the weights an arm delivers: the SWA average for SWA arms."""
    p = "swa/" if swa else ""
    return summary[f"{p}eval/accuracy"], summary[f"{p}eval/loss"]


def run_all(ex: ProcessPoolExecutor, jobs: dict, tmp: str, tag: str) -> dict:
    futures = {}
    for i, (key, make) in enumerate(jobs.items()):
        futures[key] = ex.submit(_run, make(os.path.join(tmp, f"{tag}{i}")))
    done = {}
    for i, (key, fut) in enumerate(futures.items(), 1):
        done[key] = fut.result()
        if i % 20 == 0 or i == len(futures):
            print(f"{tag}: {i}/{len(futures)} runs", file=sys.stderr, flush=True)
    return done


def tune(ex: ProcessPoolExecutor, args: argparse.Namespace, tmp: str) -> tuple[dict, list[str]]:
    """Per variant: the sgd lr and the SWA (lr, swa.lr) with the lowest mean NLL on the dev seeds."""
    seeds = range(DEV_SEED0, DEV_SEED0 + args.dev_seeds)
    jobs = {}
    for variant, vov in VARIANTS.items():
        for lr in GRID_LR:
            for arm, swa_lrs in ((ARMS[0], (None,)), (ARMS[1], [x for x in GRID_SWA_LR if x <= lr])):
                for swa_lr in swa_lrs:
                    for seed in seeds:
                        jobs[(variant, arm.name, lr, swa_lr, seed)] = (
                            lambda out, a=arm, v=vov, lr=lr, s=swa_lr, sd=seed: overrides(
                                a, args.epochs, args.anneal, lr, s, v, sd, out
                            )
                        )
    done = run_all(ex, jobs, tmp, "tune")
    scores: dict = {}
    for (variant, arm, lr, swa_lr, _), summary in done.items():
        scores.setdefault((variant, arm, lr, swa_lr), []).append(final(summary, arm != "sgd")[1])
    picks, lines = {}, ["| variant | arm | lr | swa.lr | dev NLL (mean) |", "|---|---|---|---|---|"]
    for (variant, arm, lr, swa_lr), nlls in scores.items():
        lines.append(
            f"| {variant} | {arm} | {lr} | {'' if swa_lr is None else swa_lr} | "
            f"{statistics.fmean(nlls):.4f} |"
        )
        best = picks.get((variant, arm))
        if best is None or statistics.fmean(nlls) < best[2]:
            picks[(variant, arm)] = (lr, swa_lr, statistics.fmean(nlls))
    return picks, lines


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def fmt(xs: list[float], scale: float = 1.0, digits: int = 2) -> str:
    m, se = mean_se([x * scale for x in xs])
    return f"{m:.{digits}f} ± {se:.{digits}f}"


def report(
    results: dict, picks: dict, tune_lines: list[str], args: argparse.Namespace, wall: float, command: str
) -> str:
    seeds = list(range(args.seeds))
    start = round(0.75 * args.epochs)
    lines = [
        "# SWA vs SGD-momentum on digits",
        "",
        f"Command: `{command}` ({wall / 60:.1f} min wall, {args.jobs} worker process(es); "
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPU cores).",
        "",
        "Setup: BatchNorm MLP 64-64-64-10 on the fixed 1437/360 digits split, batch 32 (44 steps/epoch), "
        f"momentum 0.9, weight decay 5e-4. `sgd`: cosine decay to 0 over {args.epochs} epochs. SWA: constant "
        f"lr, from epoch {start} SWALR (cos, {args.anneal} epochs) to swa.lr, one average per epoch end, "
        f"BatchNorm statistics refreshed before evaluation; `swa 1x` runs {args.epochs} epochs (equal "
        f"budget), `swa 1.5x` {round(1.5 * args.epochs)}. Seeds {seeds[0]}..{seeds[-1]} (model init, data "
        "order, which labels are noisy), paired across arms.",
        "",
    ]
    if picks:
        lines += [
            f"Hyper-parameters: picked per variant and arm by the lowest mean test NLL on dev seeds "
            f"{DEV_SEED0}..{DEV_SEED0 + args.dev_seeds - 1} (disjoint from the reported seeds) over lr "
            f"{list(GRID_LR)} and swa.lr {list(GRID_SWA_LR)} (swa.lr <= lr); `swa 1.5x` uses the `swa 1x` "
            "pick.",
            "",
        ]
    lines += [
        "Accuracy in %, NLL = mean test cross-entropy; mean ± standard error over seeds. "
        "Δ = paired difference to `sgd` (accuracy: SWA − sgd in percentage points, NLL: sgd − SWA; "
        "positive = SWA better); 'better' = seeds where SWA is strictly better (accuracy ties are "
        "common: one test digit is 0.28%).",
        "",
    ]
    summary_lines = []
    for variant, per_arm in results.items():
        hp = {
            a.name: picks.get((variant, "swa 1x" if a.swa else "sgd"), (args.lr, args.swa_lr)) for a in ARMS
        }
        lines += [
            f"## {variant}",
            "",
            "| arm | lr / swa.lr | weights | accuracy % | NLL | Δ accuracy (pp) | better (acc) | Δ NLL "
            "| better (NLL) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        base_acc = [final(r, False)[0] for r in per_arm["sgd"]]
        base_nll = [final(r, False)[1] for r in per_arm["sgd"]]
        lines.append(
            f"| sgd | {hp['sgd'][0]} | last iterate | {fmt(base_acc, 100)} | {fmt(base_nll, 1, 4)} | | | | |"
        )
        for arm in ARMS[1:]:
            rows = per_arm[arm.name]
            for label, swa in (("SWA average", True), ("last iterate", False)):
                acc = [final(r, swa)[0] for r in rows]
                nll = [final(r, swa)[1] for r in rows]
                d_acc = [100 * (a - b) for a, b in zip(acc, base_acc, strict=True)]
                d_nll = [b - a for a, b in zip(nll, base_nll, strict=True)]
                n_acc, n_nll = sum(d > 0 for d in d_acc), sum(d > 0 for d in d_nll)
                lines.append(
                    f"| {arm.name} | {hp[arm.name][0]} / {hp[arm.name][1]} | {label} | {fmt(acc, 100)} | "
                    f"{fmt(nll, 1, 4)} | {fmt(d_acc)} | {n_acc}/{len(rows)} | {fmt(d_nll, 1, 4)} | "
                    f"{n_nll}/{len(rows)} |"
                )
                if swa:
                    (m_acc, se_acc), (m_nll, se_nll) = mean_se(d_acc), mean_se(d_nll)
                    ties = sum(d == 0 for d in d_acc)
                    summary_lines.append(
                        f"- {variant}, {arm.name}: accuracy {m_acc:+.2f} ± {se_acc:.2f} pp (better on {n_acc}/"
                        f"{len(rows)} seeds, {ties} tied), NLL change {-m_nll:+.4f} ± {se_nll:.4f} "
                        f"(lower on {n_nll}/{len(rows)} seeds)."
                    )
        lines.append("")
    lines += ["## Summary (SWA average vs `sgd`, paired over the reported seeds)", "", *summary_lines, ""]
    if tune_lines:
        lines += ["## Development grid (dev seeds; used only for the pick)", "", *tune_lines, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=10, help="reported paired seeds 0..N-1 per variant (>= 5)")
    p.add_argument("--dev-seeds", type=int, default=5, help="seeds from 100 used to pick hyper-parameters")
    p.add_argument(
        "--no-tune", action="store_true", help="skip the pick; use --lr and --swa-lr for every arm"
    )
    p.add_argument("--epochs", type=int, default=20, help="baseline budget in epochs")
    p.add_argument("--lr", type=float, default=0.05, help="lr with --no-tune")
    p.add_argument("--swa-lr", type=float, default=0.05, help="swa.lr with --no-tune")
    p.add_argument("--anneal", type=int, default=2, help="SWALR annealing epochs")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel worker processes")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "swa.md"))
    args = p.parse_args(argv)
    if args.seeds < 2 or (not args.no_tune and args.dev_seeds < 1):
        p.error("--seeds must be >= 2 and --dev-seeds >= 1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    command = " ".join(["python bench/swa.py", *(sys.argv[1:] if argv is None else argv)])
    t0 = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="swa-bench-") as tmp,
        ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker) as ex,
    ):
        picks, tune_lines = ({}, []) if args.no_tune else tune(ex, args, tmp)
        jobs = {}
        for variant, vov in VARIANTS.items():
            for arm in ARMS:
                lr, swa_lr = picks.get((variant, "swa 1x" if arm.swa else "sgd"), (args.lr, args.swa_lr))[:2]
                for seed in range(args.seeds):
                    jobs[(variant, arm.name, seed)] = lambda out, a=arm, v=vov, lr=lr, s=swa_lr, sd=seed: (
                        overrides(a, args.epochs, args.anneal, lr, s, v, sd, out)
                    )
        done = run_all(ex, jobs, tmp, "eval")
    results: dict = {v: {a.name: [] for a in ARMS} for v in VARIANTS}
    for (variant, arm, _seed), summary in done.items():
        results[variant][arm].append(summary)
    text = report(results, picks, tune_lines, args, time.perf_counter() - t0, command)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
