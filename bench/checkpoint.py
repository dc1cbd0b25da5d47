"""Checkpoint save/load of the 25M-parameter model with AdamW state on 2 ranks.

    python -m bench.checkpoint [--world 2] [--repeats 3] [--dir DIR] [--out bench/results/checkpoint.md]

Model: 12 blocks of Linear 512→2048→512 + LayerNorm (25.2M fp32 parameters), AdamW state sharded
(ZeRO-1: each rank keeps exp_avg and exp_avg_sq of its half of every flattened parameter). Every
rank runs dist-opt's real checkpoint code (:class:`dist_opt.checkpoint.CheckpointExtension`) on a
minimal trainer: DCP files written by both ranks in parallel with fsync, CRC-32 of every file,
manifest and completion marker, and (load) validation, DCP read and hand-over to the optimizer.

Measured per repeat, median over repeats, on each rank:

* **sync save**: the time the training loop is blocked = the whole save;
* **async save**: the time the training loop is blocked (the CPU copy of the state), the time until
  the checkpoint is complete, and the time of optimizer steps run while the save is in flight
  (vs without a save: what the background writer costs the training on a 2-core machine);
* **load**: validation + DCP read + loading into the optimizer (``resume``), and rank 0's CRC-32
  verification of all files done before it;
* **baseline**: ``torch.save`` of the same tensors (exactly those in this rank's DCP file: its
  optimizer pieces and the replicated parameters DCP assigned to it) to one file + fsync, and
  ``torch.load(weights_only=True)`` of that file.

MB/s = this rank's bytes / time (both ranks write in parallel to the same disk).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.common import fmt_bytes, machine_info, make_25m_model, n_params, run_ranks


def _trainer(rank: int, world: int, out_dir: str) -> Any:
    """The parts of a Trainer a checkpoint touches, around the 25M model and a ZeRO-1 AdamW."""
    import torch

    from dist_opt.config import load_config
    from dist_opt.engine.sharded import ShardedOptimizer
    from dist_opt.schedules import build_schedule

    cfg = load_config(
        None,
        [
            f"run.out_dir={out_dir}",
            "train.steps=1000",
            "optimizer.name=adamw",
            "distributed.zero_stage=1",
            "checkpoint.keep=100",
            "tracking.wandb.mode=disabled",
        ],
    )
    model = make_25m_model()
    opt = ShardedOptimizer(model.named_parameters(), "adamw", lr=1e-3, weight_decay=0.01, zero_stage=1)
    t = SimpleNamespace(
        cfg=cfg,
        rank=rank,
        world=world,
        device=torch.device("cpu"),
        model=model,
        opt=opt,
        step=0,
        samples=0,
        consecutive_skips=0,
        run_id="bench",
        resumed_from_step=None,
        noise=None,
        total_steps=1000,
        extensions=[],
    )
    t.schedule = build_schedule(cfg, opt, None, 1000)
    return t


def _train_step(t: Any, x: Any) -> float:
    t0 = time.perf_counter()
    t.model(x).square().mean().backward()
    t.opt.step()
    t.opt.zero_grad()
    t.step += 1
    return time.perf_counter() - t0


def _bench(rank: int, world: int, root: str, repeats: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from dist_opt.checkpoint import CheckpointExtension, store
    from dist_opt.checkpoint import state as st
    from dist_opt.checkpoint.safe_metadata import load_metadata

    out: dict[str, list[float]] = {}

    def add(k: str, v: float) -> None:
        out.setdefault(k, []).append(v)

    run = os.path.join(root, "run")
    t = _trainer(rank, world, run)
    torch.manual_seed(rank)
    x = torch.randn(16, 512)
    for _ in range(2):  # AdamW state exists and is non-zero
        _train_step(t, x)
    ext = CheckpointExtension(t.cfg)
    t.extensions.append(ext)
    ext.setup(t)
    for _ in range(repeats):
        # sync
        t.step += 1
        dist.barrier()
        ext.cfg.checkpoint.async_save = False
        ext.save(t, "bench")
        rec = ext.saves[-1]
        for k in ("blocking_s", "total_s", "capture_s", "write_s", "hash_s", "bytes"):
            add(f"sync_{k}", rec.get(k, 0.0))
        # async, with training steps while the save is in flight
        dist.barrier()
        base = [_train_step(t, x) for _ in range(3)]
        t.step += 1
        dist.barrier()
        ext.cfg.checkpoint.async_save = True
        t0 = time.perf_counter()
        ext.save(t, "bench")
        rec = ext.saves[-1]
        during = []
        while len(during) < 50:  # train while any rank's save is in flight (the ranks agree on the count)
            busy = torch.tensor([float(ext._thread is not None and ext._thread.is_alive())])
            dist.all_reduce(busy, op=dist.ReduceOp.MAX)
            if not busy.item():
                break
            during.append(_train_step(t, x))
        ext.wait()
        add("async_blocking_s", rec["blocking_s"])
        add("async_total_s", time.perf_counter() - t0)
        add("step_s", statistics.median(base))
        if during:
            add("step_during_async_s", statistics.median(during))
        add("steps_during_async", float(len(during)))
        # load (what resume does after rank 0 picked the folder)
        folder = store.step_dir(ext.root, int(rec["step"]))
        dist.barrier()
        if rank == 0:
            t0 = time.perf_counter()
            assert store.check(folder, deep=True).ok
            add("verify_s", time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        ext.load(t, folder)
        add("load_s", time.perf_counter() - t0)
        for k, v in ext.last_load.items():
            add(f"load_{k}", v)
        # baseline: the same tensors with torch.save / torch.load
        # exactly the tensors this rank's DCP file holds (replicated ones are written by one rank each)
        snap = st.capture(t, ext, ext.mesh)
        written = {
            i.fqn
            for i, info in load_metadata(folder).storage_data.items()
            if info.relative_path.startswith(f"__{rank}_")
        }
        mine = {
            k: (v.to_local() if hasattr(v, "to_local") else v)
            for k, v in snap.tensors.items()
            if k in written
        }
        path = Path(root, f"baseline-{rank}.pt")
        dist.barrier()
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            torch.save(mine, f)
            f.flush()
            os.fsync(f.fileno())
        add("torch_save_s", time.perf_counter() - t0)
        add("torch_save_bytes", float(path.stat().st_size))
        dist.barrier()
        t0 = time.perf_counter()
        torch.load(path, weights_only=True)
        add("torch_load_s", time.perf_counter() - t0)
        path.unlink()
        dist.barrier()
    return out


def _med(rows: list[dict[str, list[float]]], key: str) -> list[float]:
    return [statistics.median(r[key]) if r.get(key) else float("nan") for r in rows]


def _mbps(nbytes: float, s: float) -> str:
    return f"{nbytes / 2**20 / s:.0f}" if s > 0 else "—"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir on /tmp)")
    p.add_argument("--out", default="bench/results/checkpoint.md")
    args = p.parse_args(argv)
    cli_args = list(argv if argv is not None else sys.argv[1:])
    root = tempfile.mkdtemp(prefix="dist-opt-ckpt-bench-", dir=args.dir)
    t_start = time.perf_counter()
    try:
        rows = run_ranks(_bench, args.world, (root, args.repeats), timeout_s=1800)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter() - t_start
    info = machine_info()
    n = n_params(make_25m_model())
    lines = [
        f"# Checkpoint save/load: 25M-parameter model + AdamW state, {args.world} ranks",
        "",
        f"Command: `{shlex.join(['python', '-m', 'bench.checkpoint', *cli_args])}` "
        f"({wall / 60:.1f} min wall; {info['cpu']}, {info['cores']} cores, {info['memory']}; {info['os']}; "
        f"torch {info['torch']}; {info['date']}).",
        "",
        f"Model: 12 blocks Linear 512→2048→512 + LayerNorm, {n:,} fp32 parameters; AdamW state sharded "
        "(ZeRO-1). Each rank writes its optimizer pieces and half of the (replicated, deduplicated) "
        "parameters; files are fsynced and CRC-32-hashed. Medians over "
        f"{args.repeats} repeats, per rank; MB/s = that rank's bytes / time, both ranks writing at once "
        "to one virtio disk.",
        "",
        "| rank | bytes | sync save (blocking) | MB/s | of which: CPU copy / DCP write / CRC-32 | "
        "torch.save + fsync (bytes) | MB/s | time ÷ torch.save time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sync_b, sync_t = _med(rows, "sync_bytes"), _med(rows, "sync_blocking_s")
    cap, wr, hs = _med(rows, "sync_capture_s"), _med(rows, "sync_write_s"), _med(rows, "sync_hash_s")
    ts_b, ts_t = _med(rows, "torch_save_bytes"), _med(rows, "torch_save_s")
    for r in range(args.world):
        lines.append(
            f"| {r} | {fmt_bytes(sync_b[r])} | {sync_t[r]:.2f} s | {_mbps(sync_b[r], sync_t[r])} | "
            f"{cap[r]:.2f} / {wr[r]:.2f} / {hs[r]:.2f} s | {ts_t[r]:.2f} s ({fmt_bytes(ts_b[r])}) | "
            f"{_mbps(ts_b[r], ts_t[r])} | "
            f"{sync_t[r] / ts_t[r]:.2f}× |"
        )
    ab, at = _med(rows, "async_blocking_s"), _med(rows, "async_total_s")
    st_, sd, nd = _med(rows, "step_s"), _med(rows, "step_during_async_s"), _med(rows, "steps_during_async")
    lines += [
        "",
        "## Async save (`checkpoint.async=true`)",
        "",
        "| rank | training blocked | until complete | vs sync blocked | optimizer step alone | "
        "step while saving (steps) |",
        "|---|---|---|---|---|---|",
    ]
    for r in range(args.world):
        lines.append(
            f"| {r} | {ab[r]:.2f} s | {at[r]:.2f} s | {ab[r] / sync_t[r]:.0%} | {st_[r]:.2f} s | "
            f"{sd[r]:.2f} s ({nd[r]:.0f}) |"
        )
    ld, tl, vf = _med(rows, "load_s"), _med(rows, "torch_load_s"), _med(rows, "verify_s")
    lb, lp, lr_, la = (
        _med(rows, "load_bytes"),
        _med(rows, "load_plan_s"),
        _med(rows, "load_read_s"),
        _med(rows, "load_apply_s"),
    )
    lines += [
        "",
        "## Load (resume)",
        "",
        "Each rank reads all parameters (replicated) and its own optimizer pieces; torch.load reads back the "
        "file that rank wrote in the baseline.",
        "",
        "| rank | bytes read | load | MB/s | of which: validate / DCP read / into optimizer | "
        "torch.load(weights_only) | MB/s | CRC-32 of all files (rank 0, before) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in range(args.world):
        lines.append(
            f"| {r} | {fmt_bytes(lb[r])} | {ld[r]:.2f} s | {_mbps(lb[r], ld[r])} | "
            f"{lp[r]:.2f} / {lr_[r]:.2f} / {la[r]:.2f} s | {tl[r]:.2f} s | "
            f"{_mbps(ts_b[r], tl[r])} | {f'{vf[r]:.2f} s' if r == 0 else ''} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
