"""Operator-found failure modes, each ending in one line and the right exit code within seconds:
an unusable ``run.out_dir`` (a file in its place, a parent that is a file) is refused before any
rank starts and, inside a running group, by rank 0 for every rank; a checkpoint whose tensor data
is a crafted pickle is refused as unsafe (never with advice to disable ``weights_only``); a run
directory whose checkpoints are all corrupt is not silently restarted over (``resume=latest``
refuses, ``latest_or_new`` starts over, ``auto`` resumes or starts fresh); the quickstart runs twice
in a row; and a signal that arrives after every rank recorded its exit status does not change the
launcher's exit code."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_opt.checkpoint import store
from dist_opt.checkpoint.safe_metadata import load_metadata
from dist_opt.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "task.name=synthetic",
    "task.dim=6",
    "task.hidden=10",
    "task.classes=4",
    "task.eval_size=64",
    "data.global_batch=12",
    "data.micro_batch=6",
    "train.steps=4",
    "train.progress=false",
    "tracking.wandb.mode=disabled",
    "optimizer.name=adamw",
    "optimizer.lr=0.01",
    "distributed.timeout_s=60",
]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _cli(
    tmp_path: Path, overrides: list[str], timeout: float = 120, **env: str
) -> subprocess.CompletedProcess:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    cmd = [sys.executable, "-m", "dist_opt", "train", str(cfg), *SMALL, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(**env), cwd=tmp_path)


def _main(capfd, overrides: list[str], cfg: Path) -> tuple[int, str]:
    from dist_opt.train import main

    code = main([str(cfg), *SMALL, "distributed.nproc=1", *overrides])
    return code, capfd.readouterr().err


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text("{}\n")
    return p


# -- an unusable run directory ------------------------------------------------------------------------
@pytest.mark.timeout(90)
@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_unusable_out_dir_is_refused_at_once_with_one_line(tmp_path, where):
    (tmp_path / "afile").write_text("x\n")
    out = "afile" if where == "file" else "afile/run"
    t0 = time.monotonic()
    proc = _cli(tmp_path, ["distributed.nproc=2", f"run.out_dir={out}"], timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 45
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "run.out_dir" in lines[0] and "afile" in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "c.yaml"]  # nothing written
    assert (tmp_path / "afile").read_text() == "x\n"


def _trainer_in_group(rank: int, world: int, out_dir: str) -> str:
    from dist_opt.trainer import Trainer

    cfg = load_config(None, [*SMALL, "data.micro_batch=6", f"run.out_dir={out_dir}"])
    try:
        Trainer(cfg, torch.device("cpu")).fit()
    except ConfigError as e:
        return str(e)
    return "trained"


@pytest.mark.timeout(120)
def test_unusable_out_dir_inside_a_running_group_is_refused_on_every_rank(tmp_path, world2):
    """Past the launcher's check (e.g. a user-started torchrun): rank 0 checks, every rank learns it."""
    (tmp_path / "afile").write_text("x\n")
    got = world2.run(_trainer_in_group, str(tmp_path / "afile"))
    assert all("run.out_dir" in g and "not a directory" in g for g in got), got


def test_run_dir_problem_names_each_kind(tmp_path):
    from dist_opt.run_dir import run_dir_problem

    (tmp_path / "f").write_text("x")
    assert run_dir_problem(tmp_path / "new" / "deeper") is None
    assert run_dir_problem(tmp_path) is None
    assert "is not a directory" in (run_dir_problem(tmp_path / "f") or "")
    assert f"{tmp_path / 'f'} is not a directory" in (run_dir_problem(tmp_path / "f" / "x" / "y") or "")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert f"cannot write {ro}: Permission denied" in (run_dir_problem(ro) or "")
        assert f"cannot write {ro}: Permission denied" in (run_dir_problem(ro / "sub") or "")
    assert not (tmp_path / "new").exists()


# -- unsafe tensor data ----------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_malicious_tensor_payload_is_refused_as_unsafe(tmp_path, capfd, cfg_file):
    run = tmp_path / "run"
    code, _ = _main(capfd, [f"run.out_dir={run}", "checkpoint.at_end=true"], cfg_file)
    assert code == 0
    ck = store.step_dir(store.checkpoints_dir(run), 4)
    pwned = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {pwned}",))

    # every tensor of rank 0's data file becomes a torch.save of Evil (a REDUCE of posix.system); the
    # index (.metadata), manifest and marker are rewritten to match, as an attacker would
    buf = io.BytesIO()
    torch.save(Evil(), buf)
    payload = buf.getvalue()
    md = load_metadata(ck)
    data = bytearray()
    for key, info in list(md.storage_data.items()):
        if info.relative_path == "__0_0.distcp":
            md.storage_data[key] = dataclasses.replace(info, offset=len(data), length=len(payload))
            data += payload
    (ck / "__0_0.distcp").write_bytes(bytes(data))
    (ck / ".metadata").write_bytes(pickle.dumps(md))
    manifest = json.loads((ck / store.MANIFEST).read_text())
    for name in ("__0_0.distcp", ".metadata"):
        manifest["files"][name] = store.digest(ck / name)
    (ck / store.MARKER).unlink()
    store.finalize(ck, manifest)  # integrity checks pass: as an attacker would leave it
    code, err = _main(capfd, [f"run.out_dir={tmp_path / 'victim'}", f"resume={ck}"], cfg_file)
    assert code == 2, err
    assert "refused as unsafe or corrupt" in err, err
    assert "weights_only" not in err and "write failed" not in err, err
    assert not pwned.exists()


# -- corrupt checkpoints and resume modes -------------------------------------------------------------
def _corrupt(folder: Path) -> None:
    data = folder / "__0_0.distcp"
    raw = data.read_bytes()
    data.write_bytes(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])


@pytest.mark.timeout(240)
def test_all_checkpoints_corrupt_is_refused_unless_latest_or_new(tmp_path, capfd, cfg_file):
    run = tmp_path / "run"
    save = [f"run.out_dir={run}", "checkpoint.every_steps=2"]
    assert _main(capfd, save, cfg_file)[0] == 0
    folders = [p for _, p in store.list_step_dirs(store.checkpoints_dir(run))]
    assert [p.name for p in folders] == ["step-2", "step-4"]
    for f in folders:
        _corrupt(f)
    metrics = (run / "metrics.jsonl").read_bytes()
    data = {f.name: (f / "__0_0.distcp").read_bytes() for f in folders}
    for mode in ("latest", "auto"):
        code, err = _main(capfd, [*save, f"resume={mode}"], cfg_file)
        assert code == 2, err
        refusal = [ln for ln in err.splitlines() if ln.strip()]
        assert len(refusal) == 1 and "step-4" in refusal[0] and "step-2" in refusal[0], err
        assert "refusing to start over" in refusal[0]
        assert "corrupt" in refusal[0] and "latest_or_new" in refusal[0]
        assert (run / "metrics.jsonl").read_bytes() == metrics  # the evidence stays
        assert {f.name: (f / "__0_0.distcp").read_bytes() for f in folders} == data
    code, err = _main(capfd, [*save, "resume=latest_or_new"], cfg_file)
    assert code == 0 and "starting from step 0" in err, err
    assert all(store.check(f).ok for f in folders)  # rewritten by the new run


@pytest.mark.timeout(240)
def test_resume_auto_starts_fresh_then_resumes(tmp_path, capfd, cfg_file):
    run = tmp_path / "run"
    ov = [f"run.out_dir={run}", "checkpoint.at_end=true", "resume=auto"]
    code, err = _main(capfd, ov, cfg_file)
    assert code == 0 and "resumed" not in err, err
    first = torch.load(run / "final_params.pt", weights_only=True)
    code, err = _main(capfd, ov, cfg_file)
    assert code == 0 and "resumed from" in err and "(step 4," in err, err
    assert "the run is complete (step 4 of 4): nothing to train" in err
    again = torch.load(run / "final_params.pt", weights_only=True)
    assert all(torch.equal(first[k], again[k]) for k in first)  # nothing trained twice


@pytest.mark.timeout(300)
def test_quickstart_runs_twice_in_a_row(tmp_path):
    q = ["configs/quickstart.yaml", "train.steps=2", "train.eval_every=0", "train.progress=false"]
    q += ["task.max_files=3", "distributed.nproc=1", f"run.out_dir={tmp_path / 'qs'}"]
    q += ["tracking.wandb.mode=disabled"]
    cmd = [sys.executable, "-m", "dist_opt", "train", *q]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env(), cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    assert store.complete_steps(store.checkpoints_dir(tmp_path / "qs"))
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env(), cwd=ROOT)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "(step 2," in second.stderr


# -- signals after the run ---------------------------------------------------------------------------
def _run_until_statuses_recorded(tmp_path: Path) -> tuple[subprocess.Popen, dict[int, int]]:
    """Start a 2-rank run whose ranks sleep after recording their exit status; return it and the
    ranks' pids once both recorded 0."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    cmd = [sys.executable, "-m", "dist_opt", "train", str(cfg), *SMALL, "distributed.nproc=2"]
    cmd += [f"run.out_dir={tmp_path / 'run'}", "checkpoint.at_end=true"]
    env = _env(DIST_OPT_TEST_SLEEP_AFTER_EXIT_STATUS="60")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    assert proc.stderr is not None
    pids: dict[int, int] = {}
    lines = []
    while len(pids) < 2:
        line = proc.stderr.readline()
        assert line, "".join(lines)
        lines.append(line)
        for rank, pid, code in re.findall(r"rank (\d+) \(pid (\d+)\) recorded exit status (-?\d+)", line):
            assert code == "0", line
            pids[int(rank)] = int(pid)
    return proc, pids


@pytest.mark.timeout(240)
@pytest.mark.parametrize("target", ["launcher", "rank"])
def test_a_signal_after_every_rank_finished_keeps_exit_code_0(tmp_path, target):
    proc, pids = _run_until_statuses_recorded(tmp_path)
    os.kill(proc.pid if target == "launcher" else pids[1], signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "dist-opt: rank(s) failed" not in err and "dist-opt: SIGTERM" not in err, err
    assert store.check(store.step_dir(store.checkpoints_dir(tmp_path / "run"), 4)).ok


# -- config changes on resume (dist_opt/checkpoint/resume_policy.py) ----------------------------------
COSINE = ["schedule.name=cosine", "schedule.min_lr=0.001", "checkpoint.every_steps=2"]


def _lrs(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in rows if "lr" in r}


@pytest.mark.timeout(240)
def test_changed_lr_on_resume_is_applied_and_said(tmp_path, capfd, cfg_file):
    base = tmp_path / "base"
    assert _main(capfd, [*COSINE, f"run.out_dir={base}"], cfg_file)[0] == 0
    ck = store.step_dir(store.checkpoints_dir(base), 2)
    fresh = tmp_path / "fresh"  # what lr=0.02 gives at steps 3 and 4
    assert _main(capfd, [*COSINE, "optimizer.lr=0.02", f"run.out_dir={fresh}"], cfg_file)[0] == 0
    same = tmp_path / "same"
    assert _main(capfd, [*COSINE, f"run.out_dir={same}", f"resume={ck}"], cfg_file)[0] == 0
    new = tmp_path / "new"
    code, err = _main(capfd, [*COSINE, "optimizer.lr=0.02", f"run.out_dir={new}", f"resume={ck}"], cfg_file)
    assert code == 0, err
    assert "resume: optimizer.lr 0.01 -> 0.02 (applied from step 2" in err, err
    assert _lrs(same) == {s: v for s, v in _lrs(base).items() if s > 2}
    assert _lrs(new) == {s: v for s, v in _lrs(fresh).items() if s > 2}
    assert _lrs(new) != _lrs(same)
    a = torch.load(same / "final_params.pt", weights_only=True)
    b = torch.load(new / "final_params.pt", weights_only=True)
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(240)
def test_changed_weight_decay_on_resume_changes_the_parameters(tmp_path, capfd, cfg_file):
    base = tmp_path / "base"
    assert _main(capfd, [*COSINE, "optimizer.weight_decay=0.01", f"run.out_dir={base}"], cfg_file)[0] == 0
    ck = store.step_dir(store.checkpoints_dir(base), 2)
    ov = [*COSINE, "optimizer.weight_decay=0.5", f"run.out_dir={tmp_path / 'wd'}", f"resume={ck}"]
    code, err = _main(capfd, ov, cfg_file)
    assert code == 0 and "resume: optimizer.weight_decay 0.01 -> 0.5 (applied" in err, err
    a = torch.load(base / "final_params.pt", weights_only=True)
    b = torch.load(tmp_path / "wd" / "final_params.pt", weights_only=True)
    assert not torch.equal(a["fc1.weight"], b["fc1.weight"])


@pytest.mark.timeout(240)
def test_changed_seed_or_schedule_on_resume_is_refused(tmp_path, capfd, cfg_file):
    base = tmp_path / "base"
    assert _main(capfd, [*COSINE, f"run.out_dir={base}"], cfg_file)[0] == 0
    ck = store.step_dir(store.checkpoints_dir(base), 2)
    out = tmp_path / "other"
    code, err = _main(capfd, [*COSINE, "run.seed=7", f"run.out_dir={out}", f"resume={ck}"], cfg_file)
    assert code == 2, err
    assert "run.seed: checkpoint has 0, config has 7; cannot change on resume" in err
    assert "keep run.seed=0" in err and "start a new run" in err
    code, err = _main(
        capfd, [*COSINE, "schedule.min_lr=0.002", f"run.out_dir={out}", f"resume={ck}"], cfg_file
    )
    assert code == 2 and "schedule.min_lr: checkpoint has 0.001, config has 0.002" in err, err
    assert not out.exists()  # refused before anything is written


@pytest.mark.timeout(240)
def test_longer_train_steps_on_resume_stretch_the_schedule(tmp_path, capfd, cfg_file):
    """A cosine run of 4 steps resumed with train.steps=8: from step 4 on the lr is that of an 8-step
    run at the same steps (it never climbs back up past the old schedule's end)."""
    base = tmp_path / "base"
    assert _main(capfd, [*COSINE, f"run.out_dir={base}"], cfg_file)[0] == 0
    long = tmp_path / "long"
    assert _main(capfd, [*COSINE, "train.steps=8", f"run.out_dir={long}"], cfg_file)[0] == 0
    ck = store.step_dir(store.checkpoints_dir(base), 4)
    more = tmp_path / "more"
    code, err = _main(capfd, [*COSINE, "train.steps=8", f"run.out_dir={more}", f"resume={ck}"], cfg_file)
    assert code == 0 and "resume: train.steps 4 -> 8 (applied from step 4" in err, err
    got = _lrs(more)
    assert sorted(got) == [5, 6, 7, 8]
    assert got == {s: v for s, v in _lrs(long).items() if s > 4}
    assert all(got[s + 1] <= got[s] for s in range(5, 8))


def test_readme_documents_the_resume_policy_table():
    from dist_opt.checkpoint.resume_policy import POLICY

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = [ln for ln in readme.splitlines() if ln.startswith("| `") or ln.startswith("| other `")]
    for key, verdict, _ in POLICY:
        name = f"{key}*" if key.endswith(".") else key
        names = {f"`{name}`", f"`{name.rsplit('.', 1)[-1]}`"} if not key.endswith(".") else {f"`{name}`"}
        assert any(any(n in row for n in names) and verdict in row for row in rows), (key, verdict)


def test_policy_decides_each_kind_of_change():
    from dist_opt.checkpoint.resume_policy import decide

    saved = {"optimizer": {"lr": 0.003, "betas": [0.9, 0.99]}, "run": {"seed": 0, "out_dir": "a"}}
    saved["schedule"] = {"name": "cosine"}
    saved["train"] = {"steps": 10}
    now = {"optimizer": {"lr": 0.01, "betas": [0.9, 0.95]}, "run": {"seed": 0, "out_dir": "b"}}
    now["schedule"] = {"name": "cosine"}
    now["train"] = {"steps": 20}
    d = decide(saved, now, step=7)
    assert d.applied == {"optimizer.lr": (0.003, 0.01), "train.steps": (10, 20)} and d.reschedule
    assert d.lines[0].startswith("resume: optimizer.lr 0.003 -> 0.01 (applied from step 7: ")
    assert d.refused == [
        "optimizer.betas: checkpoint has [0.9, 0.99], config has [0.9, 0.95]; cannot change on resume (the "
        "optimizer's state was built with it: keep optimizer.betas=[0.9, 0.99], or start a new run in "
        "another run.out_dir)"
    ]
    now["schedule"] = {"name": "constant"}  # a new length does not change a constant schedule
    saved["schedule"] = {"name": "constant"}
    assert "train.steps" not in decide(saved, now, step=7).applied
