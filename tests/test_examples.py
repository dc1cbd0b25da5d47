"""Every example in examples/ runs as a user would start it (small settings), and the README shows
the real diff of the converted plain script."""

from __future__ import annotations

import difflib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from harness import run_ok

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "LOGLEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
        "WANDB_MODE": "disabled",  # W&B is not under test here
    }


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.timeout(300)
def test_cnn_digits_example_trains_with_lars_warmup_and_swa(tmp_path):
    run = tmp_path / "cnn"
    run_ok(
        [
            sys.executable,
            str(EXAMPLES / "cnn_digits.py"),
            f"run.out_dir={run}",
            "train.epochs=3",
            "swa.start_epoch=2",
            "train.eval_every=0",
            "checkpoint.every_steps=0",
            "schedule.warmup_steps=4",
            "data.num_workers=1",
            "data.global_batch=64",
            "data.micro_batch=32",
            "optimizer.lr=1.0",
        ],
        cwd=tmp_path,
        env=_env(),
        timeout=280,
    )
    s = _summary(run)
    assert s["world_size"] == 2 and s["steps"] == 3 * (1500 // 64)
    assert s["eval/accuracy"] > 0.5  # three epochs of LARS already learn most digits (chance: 0.1)
    swa = torch.load(run / "swa_model.pt", weights_only=True)
    assert any(k.endswith("running_mean") for k in swa)


@pytest.mark.timeout(300)
def test_gpt_example_named_by_import_path_trains_with_lamb_zero2(tmp_path):
    run = tmp_path / "gpt"
    run_ok(
        [
            sys.executable,
            "-m",
            "dist_opt",
            "train",
            "config.yaml",
            f"run.out_dir={run}",
            "train.steps=20",
            "schedule.warmup_steps=2",
            "train.eval_every=0",
            "train.progress=false",
            "task.options={seq_len: 32, d_model: 32, n_layers: 1, n_heads: 2, max_files: 20}",
            "data.global_batch=16",
            "data.micro_batch=8",
        ],
        cwd=EXAMPLES / "gpt_stdlib",
        env=_env(),
        timeout=280,
    )
    cfg = (run / "config.yaml").read_text()
    assert "tiny_gpt:TinyGPTTask" in cfg and "zero_stage: 2" in cfg and "name: lamb" in cfg
    s = _summary(run)
    assert s["steps"] == 20 and s["eval/loss"] < 5.55  # below the uniform byte loss ln(256)


@pytest.mark.timeout(300)
def test_converted_plain_script_runs_and_the_readme_shows_its_real_diff(tmp_path):
    script = (EXAMPLES / "plain_script" / "after.py").read_text()
    assert '"train": {"epochs": 5}' in script
    (tmp_path / "after.py").write_text(script.replace('"train": {"epochs": 5}', '"train": {"epochs": 1}'))
    run_ok([sys.executable, "after.py"], cwd=tmp_path, env=_env(), timeout=280)
    s = _summary(tmp_path / "runs" / "default")
    assert s["world_size"] == 2 and s["steps"] == 2048 // 64 and s["train_loss"] < 1.4  # chance: ln 5 = 1.61
    before = (EXAMPLES / "plain_script" / "before.py").read_text().splitlines()
    after = (EXAMPLES / "plain_script" / "after.py").read_text().splitlines()
    changed = [
        ln
        for ln in difflib.unified_diff(before, after, lineterm="", n=0)
        if ln[:1] in "+-" and not ln.startswith(("+++", "---"))
    ]
    readme = (ROOT / "README.md").read_text()
    for line in changed:
        assert line in readme, f"README's diff lacks: {line}"
    assert sum(ln.startswith("+") for ln in changed) <= 10
