"""How runs fail, with real processes and real signals (see README "What happens when things fail").

- a hung rank (test hook DIST_OPT_TEST_HANG_AT_STEP) or a SIGKILLed rank: the launch ends within
  distributed.timeout_s + a margin, naming the collective and the missing rank;
- preemption: SIGUSR1 to one rank, SIGTERM to the launcher's process group (torchrun forwards it),
  SIGINT to a local run: every rank stops after the same step, a complete checkpoint is written,
  the tracking run is closed, exit code 4, and resuming continues exactly;
- a non-finite loss storm: exit code 3 and a checkpoint of the last good state;
- disk full / read-only run directory during a checkpoint: a clear error, the previous checkpoint intact;
- a mismatched resume is refused, listing the mismatched keys/shapes, before anything is overwritten.

Runs with one rank use ``dist_opt.train.main`` in this process (fast); signals and several ranks
use the real CLI (``python -m dist_opt train``, which starts the ranks through torchrun).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from environment import require_or_skip

from dist_opt import diagnose, faults
from dist_opt.train import EXIT_STOPPED
from dist_opt.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
BASE = [
    "task.name=synthetic",
    "task.dim=6",
    "task.hidden=10",
    "task.classes=4",
    "data.global_batch=12",
    "train.progress=false",
    "tracking.wandb.mode=disabled",
    "task.eval_size=64",
    "train.eval_every=0",
    "optimizer.name=adamw",
    "optimizer.lr=0.01",
    "optimizer.weight_decay=0.01",
]


# -- helpers -------------------------------------------------------------------------------------------------
def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIST_OPT_TEST_")}
    env.update(
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
        WANDB_SILENT="true",
        LOGLEVEL="WARNING",
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env


class Launch:
    """``python -m dist_opt train EMPTY.yaml ARGS`` in its own session (so it can be signalled as a group)."""

    def __init__(self, tmp: Path, args: list[str], env: dict[str, str], name: str = "launch"):
        cfg = tmp / "empty.yaml"
        cfg.write_text("{}\n")
        self.out = (tmp / f"{name}.out").open("w+")
        self.err = (tmp / f"{name}.err").open("w+")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dist_opt", "train", str(cfg), *BASE, *args],
            cwd=REPO,
            env=env,
            stdout=self.out,
            stderr=self.err,
            start_new_session=True,
        )

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            for pid in descendants(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait(10)
            pytest.fail(f"launch did not end within {timeout}s:\n{self.stderr()[-3000:]}")

    def stderr(self) -> str:
        self.err.flush()
        self.err.seek(0)
        return self.err.read()

    def stdout(self) -> str:
        self.out.flush()
        self.out.seek(0)
        return self.out.read()


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for f in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids = [int(x) for x in f.read_text().split()]
                out += kids
                todo += kids
    return out


def rank_pids(launcher: int, world: int, timeout: float = 60) -> dict[int, int]:
    """PID of every rank (processes under the launcher running dist_opt.train, by their RANK variable)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for pid in descendants(launcher):
            with contextlib.suppress(OSError):
                if b"dist_opt.train" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    continue
                raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                env = dict(x.split(b"=", 1) for x in raw if b"=" in x)
                if b"RANK" in env:
                    found[int(env[b"RANK"])] = pid
        if len(found) == world:
            return found
        time.sleep(0.2)
    raise AssertionError(f"ranks not found under {launcher}")


def train_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip().endswith("}")]
    return [m for m in lines if "loss" in m and "step" in m]


def wait_for_step(run_dir: Path, step: int, launch: Launch, timeout: float = 90) -> float:
    """Wait until metrics.jsonl holds ``step``; returns the time it was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(m["step"] >= step for m in train_steps(run_dir)):
            return time.monotonic()
        if launch.proc.poll() is not None:
            raise AssertionError(
                f"run ended (rc {launch.proc.returncode}) before step {step}:\n{launch.stderr()[-3000:]}"
            )
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s:\n{launch.stderr()[-3000:]}")


def in_process(tmp: Path, args: list[str]) -> tuple[int, str]:
    """``dist_opt.train.main`` with one rank in this process; (exit code, stderr)."""
    cfg = tmp / "empty.yaml"
    cfg.write_text("{}\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = train_main([str(cfg), *BASE, *args, "distributed.nproc=1"])
    return code, err.getvalue()


@pytest.fixture(autouse=True)
def _no_test_hooks(monkeypatch):
    for k in list(os.environ):
        if k.startswith("DIST_OPT_TEST_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # (it overrides tracking.wandb.mode)


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_params.pt", weights_only=True)


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in a run directory (marker, manifest and every file's sha256)."""
    from dist_opt.checkpoint.store import check, checkpoints_dir, list_step_dirs

    return [step for step, folder in list_step_dirs(checkpoints_dir(run_dir)) if check(folder, deep=True).ok]


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- unit level ----------------------------------------------------------------------------------------------
def test_signal_names_and_backend_messages():
    assert faults.signal_by_name("term") is signal.SIGTERM
    assert faults.signal_by_name("SIGUSR1") is signal.SIGUSR1
    for bad in ("SIGKILL", "stop", "SIGNOPE"):
        with pytest.raises(ValueError):
            faults.signal_by_name(bad)
    err = RuntimeError(
        "[/x/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1. This is "
        "typically caused by a remote worker crashing. GLHF!"
    )
    assert diagnose.is_collective_failure(err)
    assert diagnose.backend_message(err) == "Connection closed by peer [127.0.0.1]:1."
    assert not diagnose.is_collective_failure(RuntimeError("shape mismatch"))
    assert not diagnose.is_collective_failure(ValueError("gloo"))


def test_collective_failure_names_the_collective_and_the_caller():
    import torch.distributed as dist

    def failing_all_reduce():
        # a real c10d call that fails: the group is not initialised
        dist.all_reduce(torch.ones(1))

    try:
        failing_all_reduce()
    except (RuntimeError, ValueError) as e:
        name = diagnose.collective_name(e)
    assert name.startswith("all_reduce"), name


# -- hung and dead peers -------------------------------------------------------------------------------------
def failure_line(err: str, rank: int) -> str:
    """The one line rank ``rank`` printed about its failed collective."""
    lines = [x for x in err.splitlines() if x.startswith(f"dist-opt: rank {rank}: ") and " after step " in x]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


HANG_TIMEOUT_S = 10
# startup of a step's collectives, the grace period to hear from the other ranks (3 s) and teardown
MARGIN_S = 15


@pytest.mark.timeout(150)
def test_hung_rank_ends_every_rank_within_the_timeout(tmp_path):
    run_dir = tmp_path / "run"
    launch = Launch(
        tmp_path,
        [
            "data.micro_batch=4",
            "distributed.nproc=3",
            "train.steps=100000",
            f"distributed.timeout_s={HANG_TIMEOUT_S}",
            f"run.out_dir={run_dir}",
        ],
        cli_env(DIST_OPT_TEST_HANG_AT_STEP="1:3"),
    )
    seen = wait_for_step(run_dir, 3, launch)  # rank 1 hangs right after step 3
    rc = launch.wait(HANG_TIMEOUT_S + MARGIN_S + 60)
    elapsed = time.monotonic() - seen
    err = launch.stderr()
    assert rc != 0, err[-3000:]
    assert elapsed <= HANG_TIMEOUT_S + MARGIN_S, f"took {elapsed:.1f}s after the hang began:\n{err[-3000:]}"
    for rank in (0, 2):  # every healthy rank names the collective, the step and the hung rank
        line = failure_line(err, rank)
        assert "timed out after step 3" in line and f"distributed.timeout_s={HANG_TIMEOUT_S}" in line, line
        assert "missing: rank 1 is alive but did not join (hung after step 3)" in line, line
        where = r"(async collective|all_reduce|reduce_scatter\w*) \((wait )?at dist_opt/\S+:\d+ in "
        assert re.search(where, line), line
    assert "Traceback" not in err, err[-3000:]
    assert max(m["step"] for m in train_steps(run_dir)) == 3


@pytest.mark.timeout(150)
def test_killed_rank_is_named_and_the_others_end(tmp_path):
    run_dir = tmp_path / "run"
    launch = Launch(
        tmp_path,
        [
            "data.micro_batch=6",
            "distributed.nproc=2",
            "train.steps=100000",
            f"distributed.timeout_s={HANG_TIMEOUT_S}",
            f"run.out_dir={run_dir}",
        ],
        cli_env(DIST_OPT_TEST_STEP_SLEEP="0.05"),
    )
    pids = rank_pids(launch.proc.pid, 2)
    wait_for_step(run_dir, 3, launch)
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    rc = launch.wait(HANG_TIMEOUT_S + MARGIN_S + 60)
    err = launch.stderr()
    assert rc != 0
    assert time.monotonic() - killed <= HANG_TIMEOUT_S + MARGIN_S, err[-3000:]
    line = failure_line(err, 0)
    assert "missing: rank 1 is not responding (dead or unreachable" in line, line


# -- preemption ----------------------------------------------------------------------------------------------
PREEMPT = ["train.steps=30", "checkpoint.every_steps=0", "optimizer.name=adamw"]
SLOW = "0.05"  # seconds slept after every step (test hook), so that a signal lands mid-run


def reference_run(tmp_path: Path, steps: int) -> Path:
    """The same run uninterrupted, one rank in this process (N ranks equal it: tests/test_train.py)."""
    ref = tmp_path / f"ref-{steps}"
    code, err = in_process(
        tmp_path, [*PREEMPT, f"train.steps={steps}", "data.micro_batch=12", f"run.out_dir={ref}"]
    )
    assert code == 0, err
    return ref


def assert_continues_exactly(
    run_dir: Path, ref: Path, stops: list[int], rtol: float = 0, atol: float = 0
) -> None:
    """Final weights equal the uninterrupted run's, every step is logged once and the losses of the
    steps after each resume are the uninterrupted run's."""
    got, want = final_params(run_dir), final_params(ref)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
    steps = train_steps(run_dir)
    ref_loss = {m["step"]: m["loss"] for m in train_steps(ref)}
    assert [m["step"] for m in steps] == sorted(ref_loss)
    for m in steps:
        if m["step"] > min(stops):
            assert m["loss"] == pytest.approx(ref_loss[m["step"]], rel=rtol, abs=atol), m["step"]


def stopped_at(launch: Launch, run_dir: Path, signal_name: str | None = None) -> int:
    """The step every rank stopped after: exit code 4, said on stderr, and a complete checkpoint of it."""
    rc = launch.wait(120)
    err = launch.stderr()
    assert rc == EXIT_STOPPED, err[-3000:]
    stop = max(m["step"] for m in train_steps(run_dir))
    reason = f": received {signal_name}" if signal_name else ""
    assert f"dist-opt: stopping after step {stop}{reason}" in err, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert checkpoint_steps(run_dir)[-1] == stop
    return stop


@pytest.mark.timeout(240)
def test_preemption_signals_stop_every_rank_with_a_checkpoint_and_resume_continues(tmp_path):
    """A 2-rank job preempted twice, then finished:

    1. SLURM-style SIGUSR1 to rank 1 only: the ranks agree and all stop after the same step;
    2. resumed, then SIGTERM to the launcher's process group (as a scheduler or Ctrl-C in a terminal
       does): torchrun forwards it to the ranks; the W&B run is closed with its exit record;
    3. resumed to the end (on one rank: the checkpoint reshards) == the uninterrupted run.
    """
    run_dir = tmp_path / "run"
    args = [*PREEMPT, "data.micro_batch=6", "distributed.nproc=2", f"run.out_dir={run_dir}"]
    first = Launch(tmp_path, args, cli_env(DIST_OPT_TEST_STEP_SLEEP=SLOW))
    pids = rank_pids(first.proc.pid, 2)
    wait_for_step(run_dir, 3, first)
    os.kill(pids[1], signal.SIGUSR1)
    stop1 = stopped_at(first, run_dir)
    assert 3 <= stop1 < 30

    second = Launch(
        tmp_path,
        [*args, "resume=latest", "tracking.wandb.mode=offline"],
        cli_env(DIST_OPT_TEST_STEP_SLEEP=SLOW, WANDB_MODE="offline"),
        name="second",
    )
    wait_for_step(run_dir, stop1 + 3, second)
    os.killpg(second.proc.pid, signal.SIGTERM)
    stop2 = stopped_at(second, run_dir, "SIGTERM")
    assert stop1 < stop2 < 30
    # tracking closed cleanly: metrics.jsonl ends with a whole line; the W&B run file has its exit record
    assert (run_dir / "metrics.jsonl").read_text().endswith("\n")
    from dist_opt.tracking.wandb_run import find_wandb_files, has_exit_record

    files = find_wandb_files(run_dir)
    assert files and all(has_exit_record(f) for f in files)

    code, err = in_process(tmp_path, [*args, "resume=latest"])
    assert code == 0, err
    assert_continues_exactly(run_dir, reference_run(tmp_path, 30), [stop1, stop2], rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(120)
def test_sigint_on_a_local_run_saves_and_resume_is_bitwise_exact(tmp_path):
    """Ctrl-C on a one-process run: stop at the step boundary, checkpoint, exit 4; resume == uninterrupted."""
    run_dir = tmp_path / "run"
    args = [*PREEMPT, "data.micro_batch=12", "distributed.nproc=1", f"run.out_dir={run_dir}"]
    launch = Launch(tmp_path, args, cli_env(DIST_OPT_TEST_STEP_SLEEP=SLOW))
    wait_for_step(run_dir, 3, launch)
    os.killpg(launch.proc.pid, signal.SIGINT)
    stop = stopped_at(launch, run_dir, "SIGINT")
    code, err = in_process(tmp_path, [*args, "resume=latest"])
    assert code == 0, err
    assert_continues_exactly(run_dir, reference_run(tmp_path, 30), [stop])


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "signals,code,says",
    [
        # a stuck rank does not ignore SIGTERM forever: no step boundary within distributed.timeout_s -> exit 1
        (
            ["SIGTERM"],
            1,
            "received SIGTERM but reached no step boundary within 3s; exiting without a checkpoint",
        ),
        # a second Ctrl-C (a second or more after the first) aborts at once
        (["SIGINT", "SIGINT"], 130, "dist-opt: rank 0: interrupted"),
    ],
)
def test_a_stuck_rank_still_ends_on_signals(tmp_path, signals, code, says):
    run_dir = tmp_path / "run"
    launch = Launch(
        tmp_path,
        [
            *PREEMPT,
            "train.steps=1000",
            "data.micro_batch=12",
            "distributed.nproc=1",
            "distributed.timeout_s=3",
            f"run.out_dir={run_dir}",
        ],
        cli_env(DIST_OPT_TEST_HANG_AT_STEP="0:2"),
    )
    wait_for_step(run_dir, 1, launch)
    deadline = time.monotonic() + 60
    while "hanging after step 2" not in launch.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    for name in signals:
        time.sleep(1.2)
        os.killpg(launch.proc.pid, signal.Signals[name])
    t0 = time.monotonic()
    rc = launch.wait(60)
    err = launch.stderr()
    assert rc == code and says in err, err[-3000:]
    assert time.monotonic() - t0 < 3 + 10
    assert "Traceback" not in err


# -- non-finite storm ----------------------------------------------------------------------------------------
def test_nonfinite_storm_stops_with_exit_3_and_checkpoints_the_last_good_state(tmp_path):
    """SGD with lr 1e30: step 1 is applied (huge but finite weights), then every gradient is non-finite."""
    run_dir = tmp_path / "run"
    storm = [
        "optimizer.name=sgd",
        "optimizer.lr=1e30",
        "optimizer.weight_decay=0",
        "train.steps=50",
        "train.max_consecutive_skips=4",
        "data.micro_batch=12",
    ]
    code, err = in_process(tmp_path, [*storm, f"run.out_dir={run_dir}"])
    assert code == 3, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert any(
        "4 consecutive steps had a non-finite gradient" in x and "train.max_consecutive_skips" in x
        for x in lines
    ), err
    steps = train_steps(run_dir)
    applied = [m["step"] for m in steps if not m["skipped"]]
    stop = applied[-1] + 4  # the 4th consecutive skip stops the run (before it is logged)
    assert [m["step"] for m in steps if m["skipped"]] == list(range(applied[-1] + 1, stop))
    assert f"stopping at step {stop}" in err
    assert checkpoint_steps(run_dir)[-1] == stop
    # the checkpoint holds the weights of the last applied step (== an uninterrupted run of that many
    # steps): resuming it with train.steps = the stop step runs no step and writes those weights out
    code, err = in_process(
        tmp_path, [*storm, f"train.steps={stop}", "resume=latest", f"run.out_dir={run_dir}"]
    )
    assert code == 0, err
    ref = tmp_path / "ref"
    code, err = in_process(tmp_path, [*storm, f"train.steps={applied[-1]}", f"run.out_dir={ref}"])
    assert code == 0, err
    saved = final_params(run_dir)
    for k, v in final_params(ref).items():
        assert torch.isfinite(saved[k]).all()
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0)


# -- disk full / unwritable run directory --------------------------------------------------------------------
@contextlib.contextmanager
def small_filesystem(path: Path, size: str = "1m"):
    """A tmpfs of ``size`` at ``path`` (root); yields a function that makes it read-only or full."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            check=True,
            capture_output=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        if os.geteuid() == 0:
            require_or_skip("cannot mount a tmpfs here and root ignores directory permissions")
        yield None  # not root: a read-only directory (chmod) does the job
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True, timeout=20)


def fill(fs: Path, leave_bytes: int) -> None:
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    with (fs / "filler").open("wb") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * max(0, free - leave_bytes))


DISK = ["optimizer.name=adamw", "task.dim=64", "task.hidden=256", "data.micro_batch=12", "checkpoint.keep=3"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_checkpoint_on_a_full_or_read_only_disk_fails_clearly_and_keeps_the_previous_one(tmp_path, fault):
    fs_dir = tmp_path / "fs"
    with small_filesystem(fs_dir, "2m") as fs:
        run_dir = fs_dir / "run"
        code, err = in_process(
            tmp_path, [*DISK, "train.steps=3", "checkpoint.every_steps=3", f"run.out_dir={run_dir}"]
        )
        assert code == 0, err
        assert checkpoint_steps(run_dir) == [3]
        before = tree_digest(run_dir / "checkpoints" / "step-3")
        if fault == "disk full" and fs is not None:
            fill(fs, 48_000)  # room for config and metrics lines, not for a checkpoint
        elif fs is not None:
            subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True, capture_output=True)
        else:
            for p in [run_dir, *run_dir.rglob("*")]:
                p.chmod(0o555 if p.is_dir() else 0o444)
        code, err = in_process(
            tmp_path,
            [*DISK, "train.steps=6", "checkpoint.every_steps=3", "resume=latest", f"run.out_dir={run_dir}"],
        )
        assert code != 0
        lines = [x for x in err.splitlines() if x.strip()]
        assert "Traceback" not in err and len(lines) <= 2, err
        if fault == "disk full":
            (line,) = [x for x in lines if x.startswith("dist-opt: rank 0: ")]
            assert line.startswith("dist-opt: rank 0: checkpoint write failed (rank(s) 0: "), line
            assert re.search(r"; 0\.\d MiB free on the file system of \S+ \(disk full\?\)$", line), line
        else:  # an unwritable run directory is refused before the run starts: one line, exit 2
            (line,) = lines
            assert code == 2 and line.startswith("config error: run.out_dir: cannot write "), line
            assert re.search(r"cannot write .*(Read-only file system|Permission denied)", line), line
        # the previous checkpoint is intact, byte for byte, and still the latest complete one
        assert tree_digest(run_dir / "checkpoints" / "step-3") == before
        assert checkpoint_steps(run_dir) == [3]
        if fs is not None:
            subprocess.run(["mount", "-o", "remount,rw", str(fs)], check=False, capture_output=True)
            (fs / "filler").unlink(missing_ok=True)
        else:
            for p in [run_dir, *run_dir.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
        # and resuming from it continues exactly once there is room again
        code, err = in_process(
            tmp_path,
            [*DISK, "train.steps=6", "checkpoint.every_steps=3", "resume=latest", f"run.out_dir={run_dir}"],
        )
        assert code == 0, err
        ref = tmp_path / "ref"
        code, err = in_process(tmp_path, [*DISK, "train.steps=6", f"run.out_dir={ref}"])
        assert code == 0, err
        for k, v in final_params(ref).items():
            torch.testing.assert_close(final_params(run_dir)[k], v, rtol=0, atol=0)


# -- mismatched resume ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change,expect",
    [
        # another model: the mismatched parameters are listed with both shapes
        (["task.hidden=12"], ["fc1.weight", "[10, 6]", "[12, 6]", "out.weight", "[4, 10]", "[4, 12]"]),
        # another optimizer: named, with the state it cannot use
        (["optimizer.name=sgd", "optimizer.lr=0.1"], ["optimizer.name", "adamw", "sgd", "exp_avg"]),
    ],
)
def test_mismatched_resume_is_refused_before_anything_is_overwritten(tmp_path, change, expect):
    run_dir = tmp_path / "run"
    code, err = in_process(tmp_path, ["train.steps=2", "data.micro_batch=12", f"run.out_dir={run_dir}"])
    assert code == 0, err
    before = tree_digest(run_dir)
    code, err = in_process(
        tmp_path, ["train.steps=4", "data.micro_batch=12", *change, "resume=latest", f"run.out_dir={run_dir}"]
    )
    assert code == 2, err
    assert "Traceback" not in err
    assert all(word in err for word in expect), err
    assert tree_digest(run_dir) == before  # nothing overwritten: checkpoints, metrics, config.yaml
