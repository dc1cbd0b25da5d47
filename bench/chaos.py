"""Chaos run: one 2-rank training run under a scripted sequence of random faults, each followed by a
restart with ``resume=latest``, compared bit for bit with the same run uninterrupted.

    python -m bench.chaos [--faults 20] [--seed 0] [--work DIR] [--out bench/results/chaos.md]

The faults (rank SIGKILL, launcher SIGKILL, launcher SIGTERM, a real disk full during a save, a
corrupted newest checkpoint, a rank stalled with SIGSTOP) are described in :mod:`bench.chaos_run`;
their order comes from ``--seed`` and every kind occurs at least once from 6 faults on. The disk-full
fault needs root (a tmpfs mount); without it that kind is left out and the results say so.

Writes a Markdown table: per fault its kind, the step it hit, the launcher's exit code, the step the
restart resumed from, the steps recomputed and the orphans found; then the totals.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.chaos_run import EXPECTED_EXIT, ZERO_RECOMPUTE, ChaosResult, plan, run_chaos, settings_for
from bench.common import machine_info


def report(result: ChaosResult, command: str, seed: int) -> str:
    """The results file (Markdown)."""
    s = result.settings
    info = machine_info()
    load = os.getloadavg()
    n = len(result.kinds)
    lines = [
        f"# Chaos run: {n} faults on a 2-rank training run, each followed by `resume=latest`",
        "",
        f"Command: `{command}` ({result.wall_s / 60:.1f} min wall, under `nice -n 10`; {info['cpu']}, "
        f"{info['cores']} cores, {info['memory']}; {info['os']}; torch {info['torch']}; {info['date']}; "
        f"load average at the end {load[0]:.1f}).",
        "",
        f"Run: synthetic classification task (MLP 64→1024→10), AdamW, warmup + cosine, "
        f"{s.steps} steps, global batch 16 over {s.nproc} ranks, `checkpoint.every_steps={s.every}`, "
        f"`checkpoint.keep=3`, `distributed.timeout_s={s.timeout_s:g}`, seed {seed}; started as "
        f"`dist-opt train CONFIG ... distributed.nproc={s.nproc} resume=latest` (local spawn), every step "
        f"followed by a {s.step_sleep:g} s sleep (test hook `DIST_OPT_TEST_STEP_SLEEP`) so that faults land "
        f"mid-run. Disk full: {result.disk}.",
        "",
        "Orphans: processes of that attempt (found in /proc by a marker in their environment) still "
        "alive 10 s after the launcher ended; counted, then killed. Steps recomputed = the last step "
        "reached before the restart - the step it resumed from. Survived = the launcher ended by "
        "itself with the expected exit code and the restart resumed from the newest usable checkpoint "
        "recomputing at most one checkpoint interval (nothing after a launcher SIGTERM or SIGKILL, "
        "where the ranks stop with a checkpoint).",
        "",
        "| # | fault | at step | exit code (expected) | resumed from | steps recomputed | orphans | survived | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(result.records, 1):
        code = "hung" if r.exit_code is None else str(r.exit_code)
        lines.append(
            f"| {i} | {r.kind} | {r.at_step} | {code} ({EXPECTED_EXIT[r.kind]}) | {r.resumed_from} | "
            f"{r.recomputed} | {r.orphans} | {'yes' if r.survived(s.every) else 'NO'} | {r.note} |"
        )
    per_kind = {}
    for r in result.records:
        per_kind[r.kind] = max(per_kind.get(r.kind, 0), r.recomputed or 0)
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(per_kind.items()))
    zero = all((r.recomputed or 0) == 0 for r in result.records if r.kind in ZERO_RECOMPUTE)
    lines += [
        "",
        "## Totals",
        "",
        f"- faults survived: **{result.survived}/{n}**",
        f"- orphans found: **{result.orphans}**",
        f"- final parameters bit-equal to the uninterrupted run (`torch.equal` on every tensor of "
        f"`final_params.pt`): **{'yes' if result.bit_equal else 'no'}**"
        + (f" (differing: {', '.join(result.differing)})" if result.differing else ""),
        f"- training loss of every step in `metrics.jsonl` equal to the uninterrupted run's: "
        f"{'yes' if result.losses_equal else 'no'}",
        f"- final attempt's exit code: {result.final_exit}",
        f"- max steps recomputed per fault: **{result.max_recomputed}** (checkpoint interval {s.every}); "
        f"per kind: {kinds}; after launcher SIGTERM/SIGKILL: {'0 every time' if zero else 'NOT 0'}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.splitlines()[0])
    p.add_argument("--faults", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=Path("bench/results/chaos.md"))
    args = p.parse_args(argv)
    command = "python -m bench.chaos " + shlex.join(sys.argv[1:] if argv is None else argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="dist-opt-chaos-"))
    t0 = time.monotonic()
    result = run_chaos(work, plan(args.faults, args.seed), settings_for(args.faults), args.seed)
    result.wall_s = time.monotonic() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(result, command.strip(), args.seed), encoding="utf-8")
    print(args.out.read_text())
    if args.work is None and result.ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs: {work / 'logs'}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
