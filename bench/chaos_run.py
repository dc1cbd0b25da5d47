"""One chaos run: a 2-rank training run through ``dist-opt train`` under a list of faults, each
followed by a restart with ``resume=latest``; then the same config uninterrupted, and the final
parameters of both compared bit for bit.

Fault kinds (:data:`KINDS`):

* ``rank_sigkill``: SIGKILL of one rank; the peer names it and the launcher exits 1;
* ``launcher_sigkill``: SIGKILL of the launcher (``dist-opt train``); the ranks must notice on
  their own (lifeline), stop with a checkpoint and be gone within 10 s;
* ``launcher_sigterm``: SIGTERM to the launcher (preemption): exit 4 and a checkpoint of the step
  every rank stopped after (nothing recomputed);
* ``disk_full``: the run directory is on a small tmpfs; a ballast file fills it right after a
  checkpoint, so the next save meets a real ENOSPC (exit 1); the ballast goes before the restart;
* ``corrupt_checkpoint``: the run is stopped (SIGTERM), then a data file of its newest complete
  checkpoint is garbled; the restart must skip it and resume from the one before;
* ``rank_stall``: SIGSTOP of one rank; with a short ``distributed.timeout_s`` its peer times out
  and fails; the stopped rank must then be ended by the framework (the chaos run only counts it
  as an orphan and kills it if it is still there 10 s after the launcher ended).

After every attempt the processes of that attempt (marked through their environment, see
:mod:`bench.chaos_faults`) get 10 s to end; those left are orphans: counted, then killed.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import chaos_faults as cf

ROOT = Path(__file__).resolve().parents[1]
KINDS = (
    "rank_sigkill",
    "launcher_sigkill",
    "launcher_sigterm",
    "disk_full",
    "corrupt_checkpoint",
    "rank_stall",
)
#: the launcher's exit code each fault must end with (-9: the launcher itself was SIGKILLed)
EXPECTED_EXIT = {
    "rank_sigkill": 1,
    "launcher_sigkill": -9,
    "launcher_sigterm": 4,
    "disk_full": 1,
    "corrupt_checkpoint": 4,
    "rank_stall": 1,
}
#: faults after which nothing may be recomputed (the ranks stopped with a checkpoint of their last step)
ZERO_RECOMPUTE = frozenset({"launcher_sigterm", "launcher_sigkill"})
ORPHAN_WAIT_S = 10.0


@dataclass
class Settings:
    """The training config of the chaos run and how faults are placed in it."""

    steps: int = 260
    every: int = 5  # checkpoint.every_steps
    nproc: int = 2
    timeout_s: float = 15.0  # distributed.timeout_s (a stalled rank is detected after this)
    step_sleep: float = 0.03  # test hook: seconds slept after every step, so faults land mid-run
    end_wait_s: float = 300.0  # an attempt that has not ended this long after its fault is hung

    def overrides(self, out_dir: Path) -> list[str]:
        return [
            "task.name=synthetic",
            "task.dim=64",
            "task.hidden=1024",
            "task.classes=10",
            "task.eval_size=64",
            "data.global_batch=16",
            "data.micro_batch=8",
            f"train.steps={self.steps}",
            "train.eval_every=0",
            "train.progress=false",
            "optimizer.name=adamw",
            "optimizer.lr=0.003",
            "optimizer.weight_decay=0.01",
            "schedule.name=cosine",
            "schedule.warmup_steps=10",
            f"checkpoint.every_steps={self.every}",
            "checkpoint.keep=3",
            f"distributed.nproc={self.nproc}",
            f"distributed.timeout_s={self.timeout_s:g}",
            "tracking.wandb.mode=disabled",
            f"run.out_dir={out_dir}",
        ]


def settings_for(n_faults: int) -> Settings:
    """Enough steps that every fault lands before the end (each attempt runs at most ~2 intervals)."""
    s = Settings()
    s.steps = max(40, 12 * n_faults + 20)
    return s


def plan(n: int, seed: int, kinds: tuple[str, ...] = KINDS) -> list[str]:
    """``n`` fault kinds in a random order from ``seed``; every kind at least once when ``n >= len(kinds)``."""
    rng = random.Random(seed)
    out = list(kinds) if n >= len(kinds) else []
    out += [rng.choice(kinds) for _ in range(n - len(out))]
    rng.shuffle(out)
    return out


@dataclass
class FaultRecord:
    kind: str
    at_step: int = 0  # the step the run had reached when the fault hit (disk_full: the failed save)
    exit_code: int | None = None  # the launcher's; None: it did not end (hung)
    last_step: int = 0  # the last step reached before the restart
    resumed_from: int | None = None  # the step the restart resumed from
    expected_resume: int | None = None  # the newest usable checkpoint before the restart
    orphans: int = 0
    note: str = ""

    @property
    def recomputed(self) -> int | None:
        return None if self.resumed_from is None else self.last_step - self.resumed_from

    def survived(self, every: int) -> bool:
        """Ended by itself with the expected exit code, and the restart resumed from the newest usable
        checkpoint without recomputing more than the fault allows."""
        limit = 0 if self.kind in ZERO_RECOMPUTE else every
        return (
            self.exit_code == EXPECTED_EXIT[self.kind]
            and self.resumed_from is not None
            and self.resumed_from == self.expected_resume
            and self.recomputed is not None
            and 0 <= self.recomputed <= limit
        )


@dataclass
class ChaosResult:
    settings: Settings
    kinds: list[str]
    records: list[FaultRecord] = field(default_factory=list)
    final_exit: int | None = None
    final_orphans: int = 0
    bit_equal: bool = False
    differing: list[str] = field(default_factory=list)
    losses_equal: bool = False
    disk: str = ""  # how the disk-full fault was made
    wall_s: float = 0.0

    @property
    def survived(self) -> int:
        return sum(r.survived(self.settings.every) for r in self.records)

    @property
    def orphans(self) -> int:
        return sum(r.orphans for r in self.records) + self.final_orphans

    @property
    def max_recomputed(self) -> int:
        return max((r.recomputed or 0 for r in self.records), default=0)

    @property
    def ok(self) -> bool:
        return (
            self.survived == len(self.kinds) and self.orphans == 0 and self.bit_equal and self.final_exit == 0
        )


class Attempt:
    """One ``dist-opt train`` launch, in its own session, its processes marked with a token."""

    def __init__(self, cfg: Path, args: list[str], token: str, log: Path, extra_env: dict[str, str]):
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIST_OPT_TEST_")}
        env.update(
            PYTHONPATH=str(ROOT),
            OMP_NUM_THREADS="1",
            WANDB_MODE="disabled",
            WANDB_SILENT="true",
            LOGLEVEL="WARNING",
            **extra_env,
        )
        env[cf.MARK_VAR] = token
        self.token, self.log = token, log
        with log.open("w") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dist_opt", "train", str(cfg), *args],
                cwd=ROOT,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait(self, timeout_s: float) -> int | None:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def resumed_step(self) -> int:
        m = re.search(r"resumed from \S+ \(step (\d+),", self.text())
        return int(m.group(1)) if m else 0


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def wait_for_step(
    run_dir: Path, target: int, attempt: Attempt, old_inode: int | None, timeout_s: float
) -> int:
    """Wait until this attempt has logged step ``target`` (a resume rewrites ``metrics.jsonl`` into a new
    file, so lines of the previous attempt are not mistaken for progress); returns the step seen, or
    -1 when the attempt ended first or the time ran out."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and attempt.proc.poll() is None:
        ino = _inode(metrics)
        if ino is not None and ino != old_inode:
            step = cf.last_step(run_dir)
            if step >= target:
                return step
        time.sleep(0.01)
    return -1


class ChaosRun:
    """The run directory, the attempts and the faults of one chaos run (see the module docstring)."""

    def __init__(
        self,
        work: Path,
        settings: Settings,
        seed: int,
        log: Callable[[str], None] = print,
        in_process_reference: bool = False,
    ):
        self.work, self.settings, self.log = work, settings, log
        self.in_process_reference = in_process_reference
        self.rng = random.Random(seed + 1)
        self.disk = cf.SmallDisk(work / "disk")
        self.cfg = work / "config.yaml"
        self.cfg.write_text("{}\n")
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.run_dir = work / "disk" / "run"
        self.history: list[Attempt] = []
        self.expected: list[int] = []  # per attempt: the newest usable checkpoint when it started
        self.token_base = f"chaos-{os.getpid()}-{seed}"

    # -- attempts -----------------------------------------------------------------------------------
    def start(self) -> tuple[Attempt, int, int | None]:
        """Start the next attempt with ``resume=latest``; returns it, the step it should resume from
        and the inode its ``metrics.jsonl`` had before."""
        expected = cf.newest_usable_step(self.run_dir)
        inode = _inode(self.run_dir / "metrics.jsonl")
        extra = {"DIST_OPT_TEST_STEP_SLEEP": str(self.settings.step_sleep)}
        attempt = Attempt(
            self.cfg,
            [*self.settings.overrides(self.run_dir), "resume=latest"],
            f"{self.token_base}-{len(self.history)}",
            self.work / "logs" / f"attempt-{len(self.history):02d}.log",
            extra,
        )
        self.history.append(attempt)
        self.expected.append(expected)
        return attempt, expected, inode

    def end(self, attempt: Attempt, timeout_s: float) -> tuple[int | None, int]:
        """Wait for the launcher; then give the attempt's processes 10 s to end by themselves. Returns
        (exit code or None if it hung, orphans found)."""
        code = attempt.wait(timeout_s)
        if code is None:
            cf.send(attempt.proc.pid, signal.SIGKILL)
            attempt.proc.wait()
        orphans = cf.reap_orphans(attempt.token, ORPHAN_WAIT_S)
        if orphans:
            self.log(f"  orphans of {attempt.token}: {orphans} (killed)")
        return code, len(orphans)

    # -- one fault ------------------------------------------------------------------------------------
    def target(self, resumed: int) -> int:
        """A step a few steps into this attempt, after the first checkpoint (so there always is one)."""
        every = self.settings.every
        return max(every + 1, resumed + self.rng.randint(3, 2 * every))

    def inject(self, kind: str, attempt: Attempt, resumed: int, inode: int | None, rec: FaultRecord) -> None:
        s = self.settings
        target = self.target(resumed)
        if kind == "disk_full":  # just after a checkpoint: the next save is the one that fails
            target += (1 - target) % s.every
        step = wait_for_step(self.run_dir, target, attempt, inode, 600.0)
        if step < 0:
            rec.note = f"the attempt ended or stalled before step {target}"
            return
        rec.at_step = step
        if kind in ("rank_sigkill", "rank_stall"):
            rank = self.rng.randrange(s.nproc)
            pid = cf.rank_pids(attempt.token, s.nproc, 5.0).get(rank)
            if pid is None:
                rec.note = f"rank {rank} not found"
                return
            cf.send(pid, signal.SIGKILL if kind == "rank_sigkill" else signal.SIGSTOP)
            rec.note = f"rank {rank}"
        elif kind == "launcher_sigkill":
            cf.send(attempt.proc.pid, signal.SIGKILL)
        elif kind in ("launcher_sigterm", "corrupt_checkpoint"):
            cf.send(attempt.proc.pid, signal.SIGTERM)
        elif kind == "disk_full":
            self.disk.fill(leave_bytes=192 * 1024)
            rec.note = f"filled after step {step}, {self.disk.free_bytes() // 1024} KiB left"

    def fault(self, kind: str) -> FaultRecord:
        rec = FaultRecord(kind)
        attempt, expected, inode = self.start()
        self.inject(kind, attempt, expected, inode, rec)
        code, orphans = self.end(attempt, self.settings.end_wait_s)
        rec.exit_code, rec.orphans = code, orphans
        rec.last_step = cf.last_step(self.run_dir)
        if kind == "disk_full":  # the save that failed is the last step reached (its line comes first)
            rec.at_step = rec.last_step
            self.disk.clear()
        if kind == "corrupt_checkpoint":
            hit = cf.corrupt_newest(self.run_dir)
            rec.note = "no checkpoint to corrupt" if hit is None else f"garbled step-{hit[0]}/{hit[1].name}"
        return rec

    def run(self, kinds: list[str]) -> ChaosResult:
        t0 = time.monotonic()
        result = ChaosResult(self.settings, list(kinds))
        if self.disk.mount():
            result.disk = f"real ENOSPC: run directory on a {self.disk.size} tmpfs filled by a ballast file"
        else:
            result.disk = f"no tmpfs ({self.disk.problem}): disk_full faults left out"
            kinds = [k for k in kinds if k != "disk_full"]
            result.kinds = list(kinds)
        try:
            for i, kind in enumerate(kinds, 1):
                rec = self.fault(kind)
                result.records.append(rec)
                self.log(
                    f"fault {i}/{len(kinds)} {kind}: at step {rec.at_step}, exit {rec.exit_code}, "
                    f"last step {rec.last_step}, orphans {rec.orphans} {rec.note}"
                )
            # the last attempt runs to the end; every attempt's resume step is read from its log
            attempt, _, _ = self.start()
            code, orphans = self.end(attempt, 600.0)
            result.final_exit, result.final_orphans = code, orphans
            for i, rec in enumerate(result.records):  # the restart after fault i is attempt i + 1
                rec.resumed_from = self.history[i + 1].resumed_step()
                rec.expected_resume = self.expected[i + 1]
            final = self.run_dir / "final_params.pt"
            reference = self.reference()
            result.bit_equal, result.differing = compare_params(final, reference / "final_params.pt")
            result.losses_equal = cf.step_losses(self.run_dir) == cf.step_losses(reference)
        finally:
            self.disk.unmount()
        result.wall_s = time.monotonic() - t0
        return result

    def reference(self) -> Path:
        """The same config uninterrupted (resume none): ``nproc`` ranks through the CLI, or with
        ``in_process_reference`` one rank in this process that takes both ranks' micro-batches in turn
        (gradient accumulation; bit for bit the same sums, and no launch to pay for)."""
        ref = self.work / "reference"
        args = [*self.settings.overrides(ref), "resume=none"]
        if self.in_process_reference:
            from dist_opt.train import main

            with (self.work / "logs" / "reference.log").open("w") as fh:
                with contextlib.redirect_stderr(fh), contextlib.redirect_stdout(fh):
                    code = main([str(self.cfg), *args, "distributed.nproc=1"])
            if code != 0:
                raise RuntimeError(f"the reference run failed (exit {code})")
            return ref
        attempt = Attempt(self.cfg, args, f"{self.token_base}-ref", self.work / "logs" / "reference.log", {})
        code, _ = self.end(attempt, 600.0)
        if code != 0:
            raise RuntimeError(f"the reference run failed (exit {code}):\n{attempt.text()[-3000:]}")
        return ref


def compare_params(a: Path, b: Path) -> tuple[bool, list[str]]:
    """Every tensor of two ``final_params.pt`` files equal bit for bit (same keys, dtypes, values)."""
    import torch

    if not a.exists():
        return False, [f"{a} missing"]
    x = torch.load(a, weights_only=True)
    y = torch.load(b, weights_only=True)
    differing = sorted(set(x) ^ set(y))
    differing += [
        k for k in sorted(set(x) & set(y)) if x[k].dtype != y[k].dtype or not torch.equal(x[k], y[k])
    ]
    return not differing and bool(x), differing


def run_chaos(
    work: Path,
    kinds: list[str],
    settings: Settings,
    seed: int,
    log: Callable[[str], None] = print,
    in_process_reference: bool = False,
) -> ChaosResult:
    """The chaos run in ``work`` (a fresh folder): the faults ``kinds`` in that order, the final attempt,
    the reference run (see :meth:`ChaosRun.reference`) and the comparison."""
    work.mkdir(parents=True, exist_ok=True)
    return ChaosRun(work, settings, seed, log, in_process_reference).run(kinds)
