"""Real launches on this machine: torchrun, deepspeed (CPU accelerator), mpiexec (Open MPI wheel) and
the local launcher start the real entry point, and end with the parameters of a single-process run
of the same global batch. Plus the loud failures: a rank dying at start, a busy port, a hung launch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from netns import write_probe

from dist_opt.checkpoint.store import check, checkpoints_dir, step_dir

REPO = Path(__file__).resolve().parents[1]
TINY = (
    "task:\n  name: synthetic\n  dim: 8\n  hidden: 16\ndata:\n  global_batch: 8\n  micro_batch: 2\n"
    "train:\n  steps: 5\n  progress: false\noptimizer:\n  name: sgd\n  lr: 0.1\n"
    "tracking:\n  wandb:\n    mode: disabled\n"
)


def launch_env(*extra_paths: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in extra_paths] + [str(REPO)])
    env.update(
        DS_ACCELERATOR="cpu",
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
        LOGLEVEL="WARNING",
    )
    return env


def run_launch(args: list[str], env: dict[str, str], timeout: float = 200) -> subprocess.CompletedProcess:
    """``dist-opt launch ARGS`` (through the dist_opt CLI), from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "dist_opt", "launch", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_run(out_dir: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    params = torch.load(out_dir / "final_params.pt", weights_only=True)
    metrics = [
        json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    return params, [m for m in metrics if "loss" in m and "step" in m]


def assert_final_checkpoint(out_dir: Path, step: int = 5) -> None:
    """The run saved at its end (``checkpoint.at_end``, the default) and that save is complete."""
    verdict = check(step_dir(checkpoints_dir(out_dir), step))
    assert verdict.ok, verdict.problem


def assert_same_run(out_dir: Path, reference: Path) -> None:
    params, metrics = read_run(out_dir)
    ref_params, ref_metrics = read_run(reference)
    assert sorted(params) == sorted(ref_params)
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, rtol=0, atol=1e-6, msg=f"parameter {name}")
    assert [m["step"] for m in metrics] == [m["step"] for m in ref_metrics] and metrics
    for got, ref in zip(metrics, ref_metrics, strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> Path:
    """One process, the same global batch (8 = micro 2 x accumulation 4)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    done = subprocess.run(
        [sys.executable, "-m", "dist_opt.train", str(tiny), "distributed.nproc=1", f"run.out_dir={out}"],
        env=launch_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "mpirun", "local"])
def test_launcher_trains_to_the_single_process_parameters(launcher, tiny, reference, tmp_path):
    out = tmp_path / "run"
    done = run_launch(
        [
            "--launcher",
            launcher,
            "--nproc-per-node",
            "2",
            "--timeout",
            "180",
            str(tiny),
            f"run.out_dir={out}",
        ],
        launch_env(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{launcher}, 1 node(s), world size 2" in done.stderr
    assert_same_run(out, reference)
    assert_final_checkpoint(out)


@pytest.fixture
def probe(tmp_path) -> tuple[Path, Path]:
    mods = tmp_path / "mods"
    write_probe(mods)
    out = tmp_path / "out"
    out.mkdir()
    return mods, out


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


@pytest.mark.timeout(120)
def test_ranks_get_omp_threads_per_rank_and_env_flags(probe):
    mods, out = probe
    done = run_launch(
        [
            "--module",
            "launch_probe",
            "--nproc-per-node",
            "2",
            "--cores-per-node",
            "6",
            "--env",
            "PROBE_EXTRA=a b;c",
            "--timeout",
            "90",
            str(out),
        ],
        launch_env(mods),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = _records(out)
    assert [r["rank"] for r in records] == [0, 1]
    for r in records:
        assert r["world"] == 2 and r["sum"] == 3.0 and r["launcher"] == "torchrun"
        assert r["omp"] == "3" and r["extra"] == "a b;c"  # 6 cores // 2 ranks


@pytest.mark.timeout(120)
def test_a_rank_dying_at_start_fails_the_launch_naming_the_node(probe):
    mods, out = probe
    env = launch_env(mods)
    t0 = time.monotonic()
    done = run_launch(
        [
            "--module",
            "launch_probe",
            "--nproc-per-node",
            "2",
            "--env",
            "PROBE_DIE_RANK=1",
            "--timeout",
            "90",
            str(out),
        ],
        env,
    )
    assert done.returncode != 0 and done.returncode != 124
    assert "node 0 (localhost) exited with code" in done.stderr
    assert "rank 1: dying at start on purpose" in done.stdout
    assert time.monotonic() - t0 < 90
    assert not list(out.glob("rank*.json"))


@pytest.mark.timeout(60)
def test_a_busy_master_port_fails_naming_node_0(probe):
    mods, out = probe
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_launch(
            ["--module", "launch_probe", "--nproc-per-node", "2", "--master-port", str(port), str(out)],
            launch_env(mods),
            timeout=50,
        )
    assert done.returncode == 1
    assert f"node 0 (localhost): master port {port} is not free" in done.stderr


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.timeout(90)
def test_timeout_stops_a_hung_launch_and_leaves_no_ranks(probe):
    mods, out = probe
    env = launch_env(mods)
    env["PROBE_SLEEP"] = "300"
    t0 = time.monotonic()
    done = run_launch(
        ["--module", "launch_probe", "--nproc-per-node", "2", "--timeout", "4", str(out)], env, timeout=80
    )
    assert done.returncode == 124
    assert "timed out after 4 s; still running: node 0 (localhost)" in done.stderr
    assert time.monotonic() - t0 < 40
    assert _processes_mentioning(str(out)) == []
