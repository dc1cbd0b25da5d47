"""DataLoader workers on a user's dataset: samples/s of the digits CNN (examples/cnn_digits.py) trained
through ``DatasetTask`` + ``fit`` with ``data.num_workers`` 0 vs 2, world of one, same steps.

    python -m bench.dataloader [--steps 60] [--rounds 3]

Writes ``bench/results/dataloader.md``. When the 1-minute load average was above ``cores - 0.5``
before the first round (other work on the machine), every round is marked ``loaded`` and no median
is given.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "dataloader.md"


def _example():
    spec = importlib.util.spec_from_file_location("cnn_digits", ROOT / "examples" / "cnn_digits.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def one_run(workers: int, steps: int, out: str) -> float:
    import dist_opt

    ex = _example()
    train, test = ex.digits_datasets()
    task = dist_opt.DatasetTask(ex.DigitsResNet, train, test)
    overrides = [
        f"run.out_dir={out}",
        f"train.steps={steps}",
        "train.epochs=null",
        "train.eval_every=0",
        "train.progress=false",
        "swa.enabled=false",
        "checkpoint.every_steps=0",
        "checkpoint.at_end=false",
        "distributed.nproc=1",
        "tracking.wandb.mode=disabled",
        "data.global_batch=64",
        "data.micro_batch=64",
        f"data.num_workers={workers}",
    ]
    if workers:
        overrides.append("data.persistent_workers=true")
    summary = dist_opt.fit(ex.CONFIG, task, overrides=overrides)
    return summary.samples_per_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dataloader", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cores = os.cpu_count() or 1
    rows = []
    start_load = os.getloadavg()[0]  # later rounds see this benchmark's own load in the average
    for r in range(args.rounds):
        load = os.getloadavg()[0]
        loaded = start_load > cores - 0.5
        for workers in (0, 2):
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                sps = one_run(workers, args.steps, d)
                rows.append((r, workers, sps, time.perf_counter() - t0, load, loaded))
                print(f"round {r} workers {workers}: {sps:.0f} samples/s (load {load:.2f})", file=sys.stderr)
    clean = [x for x in rows if not x[5]]
    med = {
        w: statistics.median([x[2] for x in clean if x[1] == w])
        for w in (0, 2)
        if any(x[1] == w for x in clean)
    }
    lines = [
        "# DataLoader workers: digits CNN through DatasetTask + fit",
        "",
        f"Command: `python -m bench.dataloader --steps {args.steps} --rounds {args.rounds}` "
        f"({time.strftime('%Y-%m-%d %H:%M')}, {cores} cores, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
        "world of one, global batch 64, the ResNet-style CNN of examples/cnn_digits.py).",
        "",
        "| round | data.num_workers | samples/s (training steps) | wall s | load avg at start | used |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r, w, sps, wall, load, loaded in rows:
        lines.append(
            f"| {r} | {w} | {sps:.0f} | {wall:.1f} | {load:.2f} | {'no (loaded)' if loaded else 'yes'} |"
        )
    lines.append("")
    if len(med) == 2:
        lines.append(
            f"Median of clean rounds: {med[0]:.0f} samples/s with 0 workers, {med[2]:.0f} with 2 "
            f"(ratio {med[2] / med[0]:.2f}). The digits are an in-memory TensorDataset: reading a sample costs "
            "less than moving it between processes, so workers only pay off when `__getitem__` does real "
            "work (decoding, augmentation, disk reads) — and with 2 cores the workers compete with the "
            "training process for the same CPUs."
        )
    else:
        lines.append("Every round ran on a loaded machine: no medians (rerun on an idle machine).")
    RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
