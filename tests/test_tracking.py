"""Tracking: metrics.jsonl, real offline W&B runs read back from their .wandb files, resume, secrets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from dist_opt.config.loader import to_dict
from dist_opt.config.schema import Config, WandbConfig
from dist_opt.tracking import Tracker, find_wandb_files, read_metrics, read_wandb_file
from dist_opt.tracking.metrics_file import MetricsFile
from dist_opt.tracking.wandb_run import effective_mode, init_kwargs, redact_argv

REPO = Path(__file__).resolve().parents[1]
API_KEY = "some-secret-xyz"
TOKEN = "s3cr3t"


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """No inherited WANDB_* settings; W&B's own config/cache dirs outside the run dir; quiet."""
    for k in list(os.environ):
        if k.startswith("WANDB_"):
            monkeypatch.delenv(k)
    home = tmp_path / "wandb_home"
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")  # no system-metrics sampler in tests
    return monkeypatch


def _cfg(run_dir: Path, **wandb: object) -> Config:
    return Config(run={"out_dir": str(run_dir)}, tracking={"wandb": {"project": "dist-opt-test", **wandb}})


def _loss(step: int) -> float:
    return 2.0 / (1.0 + step) + 0.125


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


# ------------------------------------------------------------------------------------------------
# metrics.jsonl alone


def test_metrics_file_roundtrip_nonfinite_and_torn_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    mf = MetricsFile(path)
    rows = [
        {"step": 0, "loss": 1.5, "lr": 0.1},
        {"step": 1, "loss": math.inf, "lr": 0.1, "skipped": True},
        {"step": 2, "loss": math.nan, "grad_norm": -math.inf, "tr/max_layer": "fc1.weight"},
    ]
    for r in rows:
        mf.write(r)
    mf.close()
    for line in path.read_text().splitlines():  # strict JSON: no bare NaN/Infinity tokens
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    back = read_metrics(path)
    assert back[0] == rows[0]
    assert back[1]["loss"] == math.inf and back[1]["skipped"] is True
    assert math.isnan(back[2]["loss"]) and back[2]["grad_norm"] == -math.inf
    assert back[2]["tr/max_layer"] == "fc1.weight"
    with open(path, "a") as fh:  # a run killed mid-line
        fh.write('{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2]
    path.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)


def test_metrics_file_resume_truncates_after_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    mf = MetricsFile(path)
    for s in range(10):
        mf.write({"step": s, "loss": _loss(s)})
        if s % 4 == 0:
            mf.write({"step": s, "eval/loss": _loss(s) + 1})
    mf.write({"event": "summary", "loss": 0.3})
    mf.close()
    mf = MetricsFile(path, resume_step=5)
    assert mf.previous_last_step == 9
    mf.write({"step": 6, "loss": 9.0})
    mf.close()
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 0, 1, 2, 3, 4, 4, 5, 6]
    assert all("event" not in r for r in rows)
    assert rows[-1]["loss"] == 9.0 and rows[1]["eval/loss"] == _loss(0) + 1
    MetricsFile(path).close()  # a fresh (non-resumed) run starts an empty file
    assert read_metrics(path) == []


# ------------------------------------------------------------------------------------------------
# W&B settings resolution


def test_init_kwargs_env_precedence_and_defaults(tmp_path):
    w = WandbConfig(project="p", group="g", tags=["a", "b"], name="n")
    kw = init_kwargs(w, tmp_path, "abc123", {"x": 1}, env={})
    assert kw == {
        "project": "p",
        "group": "g",
        "tags": ["a", "b"],
        "name": "n",
        "dir": str(tmp_path),
        "mode": "offline",
        "id": "abc123",
        "resume": "allow",
        "config": {"x": 1},
        "reinit": "create_new",
    }
    env = {
        "WANDB_PROJECT": "envp",
        "WANDB_RUN_GROUP": "eg",
        "WANDB_DIR": "/elsewhere",
        "WANDB_MODE": "online",
    }
    kw = init_kwargs(w, tmp_path, "abc123", {}, env=env)
    # the env var wins: the kwarg is left out so that wandb reads the variable itself
    assert "project" not in kw and "group" not in kw and "dir" not in kw and kw["mode"] == "online"
    assert init_kwargs(w, tmp_path, "abc123", {}, env={"WANDB_MODE": "disabled"}) is None
    assert init_kwargs(WandbConfig(mode="disabled"), tmp_path, "abc123", {}, env={}) is None
    assert effective_mode(WandbConfig(mode="online"), {"WANDB_MODE": "dryrun"}) == "offline"
    assert effective_mode(WandbConfig(), {"WANDB_DISABLED": "true"}) == "disabled"
    with pytest.raises(ValueError, match="WANDB_MODE"):
        effective_mode(WandbConfig(), {"WANDB_MODE": "sometimes"})
    with pytest.raises(ValueError, match="run id"):
        init_kwargs(w, tmp_path, "bad/id", {}, env={})
    assert init_kwargs(WandbConfig(dir=str(tmp_path / "w")), tmp_path, "abc", {}, env={})["dir"] == str(
        tmp_path / "w"
    )


def test_redact_argv():
    argv = [
        "train.py",
        "optimizer.lr=0.1",
        "deepspeed.config.api_token=abc",
        "--api-key",
        "k123",
        "--password=pw",
        "note=zz9plural-x",
        "run.seed=3",
        "deepspeed.config={hf_token: abc}",
    ]
    assert redact_argv(argv, ["zz9plural"]) == [
        "train.py",
        "optimizer.lr=0.1",
        "deepspeed.config.api_token=<redacted>",
        "--api-key",
        "<redacted>",
        "--password=<redacted>",
        "note=<redacted>-x",
        "run.seed=3",
        "deepspeed.config=<redacted>",
    ]


# ------------------------------------------------------------------------------------------------
# real offline W&B runs


@pytest.mark.timeout(60)
def test_offline_run_holds_history_config_and_summary(wandb_env, tmp_path):
    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir, group="sweep", tags=["t1"])
    tr = Tracker(cfg, run_dir, rank=0)
    assert tr.active and tr.wandb_mode == "offline" and tr.run_id
    n = 120
    for s in range(n):
        tr.log({"loss": _loss(s), "lr": 0.01 * (s + 1)}, step=s)
        if s % 50 == 0:
            tr.log({"eval/loss": _loss(s) + 0.5, "eval/accuracy": s / n}, step=s)  # same step: merged
    tr.log({"big_note": "x" * 40000}, step=n)  # a record larger than a 32 KiB block (chunked)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.log({"loss": 99.0}, step=3)  # out of order: jsonl yes, W&B no (warned once)
        tr.log({"loss": 98.0}, step=2)
    assert sum("W&B steps must increase" in str(w.message) for w in caught) == 1
    tr.summary({"final/loss": _loss(n - 1), "steps": n})
    tr.close()
    tr.close()  # idempotent

    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if "loss" in r and "event" not in r]
    assert [r["step"] for r in train] == list(range(n)) + [3, 2]
    assert all(r["loss"] == _loss(r["step"]) and r["lr"] == 0.01 * (r["step"] + 1) for r in train[:n])
    assert rows[-1] == {"event": "summary", "final/loss": _loss(n - 1), "steps": n}

    files = find_wandb_files(run_dir)
    assert len(files) == 1 and files[0].name == f"run-{tr.run_id}.wandb"
    wb = read_wandb_file(files[0])
    assert wb.run_id == tr.run_id and wb.project == "dist-opt-test" and wb.exit_code == 0
    assert wb.config == to_dict(cfg)
    steps = [h["_step"] for h in wb.history]
    assert steps == list(range(n + 1))
    for h in wb.history[:n]:
        s = h["_step"]
        assert h["loss"] == _loss(s) and h["lr"] == pytest.approx(0.01 * (s + 1), rel=1e-15)
        if s % 50 == 0:
            assert h["eval/loss"] == _loss(s) + 0.5 and h["eval/accuracy"] == s / n
        else:
            assert "eval/loss" not in h
    assert wb.history[n]["big_note"] == "x" * 40000
    assert wb.summary["final/loss"] == _loss(n - 1) and wb.summary["steps"] == n
    assert wb.summary["loss"] == _loss(n - 1)  # the out-of-order step-3/2 logs never reached W&B


_CRASHING_RUN = textwrap.dedent("""
    import os, sys
    from dist_opt.config.schema import Config
    from dist_opt.tracking import Tracker
    run_dir, steps = sys.argv[1], int(sys.argv[2])
    cfg = Config(run={"out_dir": run_dir}, tracking={"wandb": {"project": "dist-opt-test"}})
    tr = Tracker(cfg, run_dir, rank=0)
    for s in range(steps):
        tr.log({"loss": 1.0 / (s + 1), "lr": 0.1}, step=s)
    print(tr.run_id, flush=True)
    os._exit(137)  # killed: no close(), no W&B finish; W&B loses its unflushed tail
""")


def _wait_until_settled(path: Path, timeout_s: float = 30.0) -> None:
    """Until the ``.wandb`` file holds its run record and has stopped growing for half a second."""
    deadline, last = time.monotonic() + timeout_s, -1
    while time.monotonic() < deadline:
        size = path.stat().st_size
        if size == last and read_wandb_file(path).run_id:
            return
        last = size
        time.sleep(0.5)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("resume_step", [399, 200], ids=["ckpt_at_kill", "ckpt_before_kill"])
def test_killed_and_resumed_run_continues_same_wandb_run(wandb_env, tmp_path, resume_step):
    run_dir = tmp_path / "run"
    first_steps, end = 400, 420
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", _CRASHING_RUN, str(run_dir), str(first_steps)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 137, proc.stderr
    run_id = proc.stdout.split()[-1]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(first_steps))
    (old,) = find_wandb_files(run_dir, run_id=run_id)
    _wait_until_settled(old)  # W&B's service process writes on after the killed process is gone
    persisted = [h["_step"] for h in read_wandb_file(old).history]
    # W&B lost the tail (at least the last row, which a step > 399 or finish() would have committed)
    assert persisted == list(range(len(persisted))) and len(persisted) < first_steps

    # restart from a checkpoint taken at resume_step: later steps are recomputed (with another lr here)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = Tracker(_cfg(run_dir), run_dir, rank=0, run_id=run_id, resume_step=resume_step)
        assert tr.run_id == run_id
        for s in range(resume_step + 1, end):
            tr.log({"loss": 1.0 / (s + 1), "lr": 0.05}, step=s)
        tr.close()
    floor = persisted[-1] if persisted else -1
    assert sum("from before the resume" in str(w.message) for w in caught) == (
        1 if floor > resume_step else 0
    )

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(end))  # no duplicates, no gaps
    assert all(r["lr"] == (0.1 if r["step"] <= resume_step else 0.05) for r in rows)

    files = find_wandb_files(run_dir, run_id=run_id)
    assert len(files) == 2 and files[0] == old, files
    first, second = (read_wandb_file(f) for f in files)
    # a killed client's W&B service may itself stop before it wrote anything (then the first file
    # holds no records at all, and everything is replayed from metrics.jsonl)
    assert second.run_id == run_id and first.run_id in ("", run_id)
    assert first.run_id or not persisted
    assert first.exit_code is None and second.exit_code == 0  # the first session never finished
    s2 = [h["_step"] for h in second.history]
    # the second session starts right after what the W&B run already holds: lost steps are replayed
    # from metrics.jsonl, steps W&B already has are not re-logged
    assert s2 == list(range(floor + 1, end))
    if resume_step == first_steps - 1:
        assert floor < resume_step  # the lost steps really were replayed from metrics.jsonl
    assert persisted + s2 == list(range(end))
    lr2 = {h["_step"]: h["lr"] for h in second.history}
    assert all(lr2[s] == (0.1 if s <= resume_step else 0.05) for s in s2)


@pytest.mark.timeout(60)
def test_rank_nonzero_creates_no_files(wandb_env, tmp_path):
    run_dir = tmp_path / "run"
    tr = Tracker(_cfg(run_dir), run_dir, rank=1, run_id="given1")
    assert not tr.active and tr.wandb_run is None and tr.run_id == "given1"
    tr.log({"loss": 1.0, "lr": 0.1}, step=0)
    tr.summary({"loss": 1.0})
    tr.close()
    assert list(tmp_path.iterdir()) == []  # not even the W&B home dirs


@pytest.mark.timeout(60)
def test_wandb_mode_env_overrides_config(wandb_env, tmp_path):
    run_dir = tmp_path / "run"
    wandb_env.setenv("WANDB_MODE", "disabled")
    tr = Tracker(_cfg(run_dir, mode="offline"), run_dir, rank=0)
    assert tr.wandb_run is None and tr.wandb_mode == "disabled" and len(tr.run_id) == 8
    tr.log({"loss": 1.0, "lr": 0.1}, step=0)
    tr.close()
    assert [p.name for p in _files(run_dir)] == ["metrics.jsonl"]
    assert read_metrics(run_dir / "metrics.jsonl") == [{"step": 0, "loss": 1.0, "lr": 0.1}]

    wandb_env.setenv("WANDB_MODE", "offline")
    run_dir2 = tmp_path / "run2"
    tr = Tracker(_cfg(run_dir2, mode="disabled"), run_dir2, rank=0, run_id="envwins")
    tr.log({"loss": 1.0}, step=0)
    tr.close()
    assert [f.name for f in find_wandb_files(run_dir2)] == ["run-envwins.wandb"]


@pytest.mark.timeout(60)
def test_no_secret_in_any_file_the_run_wrote(wandb_env, tmp_path):
    run_dir = tmp_path / "run"
    wandb_env.setenv("WANDB_API_KEY", API_KEY)
    # a secret on the command line (W&B records argv) and in the config, by key name and by value
    wandb_env.setattr(
        sys, "argv", ["dist-opt", "train", f"deepspeed.config.api_token={TOKEN}", "optimizer.lr=0.1"]
    )
    cfg = _cfg(run_dir)
    cfg.deepspeed.config = {"api_token": TOKEN, "nested": {"hf_password": TOKEN}, "note": f"key is {API_KEY}"}
    tr = Tracker(cfg, run_dir, rank=0)
    for s in range(3):
        tr.log({"loss": _loss(s), "lr": 0.1}, step=s)
    tr.summary({"loss": _loss(2)})
    tr.close()

    files = _files(tmp_path)  # the run dir and W&B's own config/cache dirs
    assert any(f.suffix == ".wandb" for f in files) and len(files) >= 3
    for f in files:
        data = f.read_bytes()
        assert TOKEN.encode() not in data, f
        assert API_KEY.encode() not in data, f
    wb = read_wandb_file(find_wandb_files(run_dir)[0])  # the redaction happened (the check is not vacuous)
    assert wb.config["deepspeed"]["config"] == {
        "api_token": "<redacted>",
        "nested": {"hf_password": "<redacted>"},
        "note": "key is <redacted>",
    }
    assert "deepspeed.config.api_token=<redacted>" in wb.args and "optimizer.lr=0.1" in wb.args
    assert sys.argv[2] == f"deepspeed.config.api_token={TOKEN}"  # the process's argv itself is untouched


def test_log_rejects_bad_input(wandb_env, tmp_path):
    wandb_env.setenv("WANDB_MODE", "disabled")
    with Tracker(_cfg(tmp_path), tmp_path, rank=0) as tr:
        with pytest.raises(ValueError, match="reserved"):
            tr.log({"step": 1}, step=1)
        with pytest.raises(ValueError, match="step"):
            tr.log({"loss": 1.0}, step=-1)
        with pytest.raises(TypeError, match="'loss'"):
            tr.log({"loss": [1.0, 2.0]}, step=0)
    with pytest.raises(ValueError, match="run id"):
        Tracker(_cfg(tmp_path), tmp_path, rank=0, run_id="a/b")
