"""Ranks never outlive their launcher: SIGKILL of the launching process (the CLI's local spawn,
torchrun, or ``dist-opt launch --launcher local``) leaves no rank running 10 s later, and the ranks
stop through the agreed-stop path. And the other way round: a SIGKILLed rank ends the whole launch
within seconds (the launcher stops its peers, which then stop waiting for the dead rank's report).
And SIGTERM to ``dist-opt launch`` is a preemption: the ranks save and the launcher exits 4, although
torchrun under it exits 1 after a forwarded signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_opt.checkpoint.store import checkpoints_dir, complete_steps

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.dist,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc"),
]

ARGS = [
    "task.name=synthetic",
    "task.dim=4",
    "task.hidden=8",
    "data.global_batch=8",
    "data.micro_batch=4",
    "train.steps=100000",
    "train.progress=false",
    "tracking.wandb.mode=disabled",
    "train.eval_every=0",
    "checkpoint.at_end=false",
    "distributed.nproc=2",
]


def _descendants(pid: int) -> set[int]:
    out, frontier = set(), [pid]
    while frontier:
        p = frontier.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            if k not in out:
                out.add(k)
                frontier.append(k)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _steps(run: Path) -> int:
    try:
        return sum(
            1 for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)
        )
    except (OSError, ValueError):
        return 0


def _start_and_reach_step_3(cmd: list[str], run: Path, tmp_path: Path) -> tuple[subprocess.Popen, set[int]]:
    """Start ``cmd``; return it and the processes under it once the run has logged 3 steps."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "LOGLEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
        "DIST_OPT_TEST_STEP_SLEEP": "0.05",
    }
    log = open(tmp_path / "launcher.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    deadline = time.time() + 120
    ranks: set[int] = set()
    while time.time() < deadline and _steps(run) < 3:
        ranks |= _descendants(proc.pid)
        time.sleep(0.2)
    ranks |= _descendants(proc.pid)
    assert _steps(run) >= 3, (tmp_path / "launcher.log").read_text()[-2000:]
    assert len(ranks) >= 2
    return proc, ranks


def _kill_launcher_and_watch(cmd: list[str], run: Path, tmp_path: Path) -> None:
    proc, ranks = _start_and_reach_step_3(cmd, run, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t0 = time.time()
    while time.time() - t0 < 10 and any(_alive(p) for p in ranks):
        time.sleep(0.2)
    left = [p for p in ranks if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"processes {left} outlived their launcher by 10 s"
    steps = _steps(run)
    time.sleep(1.0)
    assert _steps(run) == steps, "metrics are still being written"


@pytest.mark.timeout(200)
def test_sigkill_of_cli_local_spawn_leaves_no_rank(tmp_path):
    run = tmp_path / "run"
    _kill_launcher_and_watch(
        [sys.executable, "-m", "dist_opt", "train", *_cfg(tmp_path), *ARGS, f"run.out_dir={run}"],
        run,
        tmp_path,
    )


@pytest.mark.timeout(200)
def test_sigkill_of_torchrun_leaves_no_rank(tmp_path):
    run = tmp_path / "run"
    _kill_launcher_and_watch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "dist_opt.train",
            *_cfg(tmp_path),
            *ARGS,
            f"run.out_dir={run}",
        ],
        run,
        tmp_path,
    )


@pytest.mark.timeout(200)
def test_sigkill_of_launch_local_leaves_no_rank(tmp_path):
    run = tmp_path / "run"
    args = [a for a in ARGS if not a.startswith("distributed.nproc=")]
    _kill_launcher_and_watch(
        [
            *LAUNCH,
            "--launcher",
            "local",
            "--nproc-per-node",
            "2",
            *_cfg(tmp_path),
            *args,
            f"run.out_dir={run}",
        ],
        run,
        tmp_path,
    )


def _rank_process(pids: set[int], rank: int) -> int:
    """The rank process (not torchrun's agent) among ``pids`` whose environment says RANK=rank."""
    for pid in pids:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if (
            f"RANK={rank}".encode() in env
            and b"dist_opt.train" in cmd
            and b"torch.distributed.run" not in cmd
        ):
            return pid
    raise AssertionError(f"no process of rank {rank} among {sorted(pids)}")


@pytest.mark.timeout(200)
def test_a_sigkilled_rank_ends_a_torchrun_launch_within_seconds(tmp_path):
    run = tmp_path / "run"
    args = [a for a in ARGS if not a.startswith("distributed.nproc=")]
    cmd = [*LAUNCH, "--nproc-per-node", "2", *_cfg(tmp_path), *args, f"run.out_dir={run}"]
    proc, ranks = _start_and_reach_step_3(cmd, run, tmp_path)
    os.kill(_rank_process(ranks, 1), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
    took = time.monotonic() - t0
    log = (tmp_path / "launcher.log").read_text()
    assert rc == 1, log[-3000:]
    # torchrun notices the dead rank within a second and stops rank 0, which then ends its diagnosis
    # at once (before, rank 0 waited out the 25 s grace for the dead rank's report: ~30 s in all)
    assert took < 15, f"the launch ended {took:.1f} s after a rank was killed\n{log[-3000:]}"
    assert "rank 1 is not responding (dead or unreachable; last heartbeat" in log, log[-3000:]


@pytest.mark.timeout(200)
def test_sigterm_to_launch_is_a_saved_preemption_with_exit_4(tmp_path):
    run = tmp_path / "run"
    args = [a for a in ARGS if not a.startswith(("distributed.nproc=", "checkpoint."))]  # checkpoints on
    cmd = [*LAUNCH, "--nproc-per-node", "2", *_cfg(tmp_path), *args, f"run.out_dir={run}"]
    proc, _ = _start_and_reach_step_3(cmd, run, tmp_path)
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
    log = (tmp_path / "launcher.log").read_text()
    assert rc == 4, log[-3000:]  # was 130 (and torchrun's own exit code is 1)
    assert "every rank ended with exit code 4 (stopped and saved)" in log, log[-3000:]
    saved = complete_steps(checkpoints_dir(run))
    assert saved and saved[-1][0] == max(
        json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" in x
    )


LAUNCH = [sys.executable, "-m", "dist_opt", "launch", "--timeout", "150"]


def _cfg(tmp_path: Path) -> list[str]:
    p = tmp_path / "cfg.yaml"
    p.write_text("{}\n")
    return [str(p)]
