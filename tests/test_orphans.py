"""Ranks never outlive their launcher: SIGKILL of the launching process (the CLI's local spawn, or
torchrun) leaves no rank running 10 s later, and the ranks stop through the agreed-stop path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def _kill_launcher_and_watch(cmd: list[str], run: Path, tmp_path: Path) -> None:
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


def _cfg(tmp_path: Path) -> list[str]:
    p = tmp_path / "cfg.yaml"
    p.write_text("{}\n")
    return [str(p)]
