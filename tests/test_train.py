"""The training loop: N ranks == 1 process for the same global batch and seed (SGD, AdamW, with and
without accumulation), metrics.jsonl contract, and a smoke run of the real CLI under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_opt.config import load_config
from dist_opt.train import Trainer

BASE = ["task.name=synthetic", "task.dim=6", "task.hidden=10", "task.classes=4", "data.global_batch=12",
        "train.steps=20", "train.progress=false", "tracking.wandb.mode=disabled", "train.eval_every=10",
        "optimizer.weight_decay=0.01", "task.eval_size=64"]


def fit(rank: int, world: int, out_dir: str, overrides: list[str]) -> dict:
    cfg = load_config(None, [*BASE, f"run.out_dir={out_dir}", *overrides])
    trainer = Trainer(cfg, torch.device("cpu"))
    trainer.fit()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def fit_single(out_dir: str, overrides: list[str]) -> dict:
    """The same loop in this process as a world of one (its own gloo group)."""
    from dist_opt.dist.env import detect
    from dist_opt.dist.group import destroy_process_group, init_process_group

    init_process_group(detect({}), "gloo", 60)
    try:
        return fit(0, 1, out_dir, overrides)
    finally:
        destroy_process_group()


OPTS = {"sgd": ["optimizer.name=sgd", "optimizer.lr=0.2"], "adamw": ["optimizer.name=adamw", "optimizer.lr=0.01"]}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("opt", list(OPTS))
def test_two_and_three_ranks_equal_one_process(tmp_path, world2, world3, opt):
    ref = fit_single(str(tmp_path / "ref"), [*OPTS[opt], "data.micro_batch=12"])
    runs = {
        "2 ranks": world2.run(fit, str(tmp_path / "w2"), [*OPTS[opt], "data.micro_batch=6"]),
        "2 ranks x 3 accumulation": world2.run(fit, str(tmp_path / "w2a"), [*OPTS[opt], "data.micro_batch=2"]),
        "2 ranks, zero stage 2 + accumulation": world2.run(fit, str(tmp_path / "w2z"),
                                                           [*OPTS[opt], "data.micro_batch=3",
                                                            "distributed.zero_stage=2"]),
        "3 ranks": world3.run(fit, str(tmp_path / "w3"), [*OPTS[opt], "data.micro_batch=4"]),
    }
    for label, per_rank in runs.items():
        for rank, params in enumerate(per_rank):
            for k in ref:
                torch.testing.assert_close(params[k], ref[k], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, k=k, label=label, rank=rank: f"{label} rank {rank} {k}: {m}")


def test_metrics_file_contract(tmp_path, world2):
    out = tmp_path / "run"
    world2.run(fit, str(out), ["optimizer.name=sgd", "optimizer.lr=0.1", "data.micro_batch=6"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert all(isinstance(r["step"], int) and "lr" in r for r in train)
    evals = [r for r in lines if "eval/loss" in r and "step" in r]
    assert [r["step"] for r in evals] == [10, 20] and all("eval/accuracy" in r for r in evals)
    cfg_saved = load_config(out / "config.yaml")
    assert cfg_saved.data.global_batch == 12
    assert (out / "final_params.pt").exists()


def _loss_of_first_step(rank: int, world: int, out_dir: str, micro: int) -> float:
    fit(rank, world, out_dir, ["optimizer.name=sgd", f"data.micro_batch={micro}", "train.steps=1"])
    dist.barrier()
    return json.loads(Path(out_dir, "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_logged_loss_is_the_global_batch_mean(tmp_path, world2):
    ref = None
    from dist_opt.dist.env import detect
    from dist_opt.dist.group import destroy_process_group, init_process_group

    init_process_group(detect({}), "gloo", 60)
    try:
        ref = _loss_of_first_step(0, 1, str(tmp_path / "a"), 12)
    finally:
        destroy_process_group()
    got = world2.run(_loss_of_first_step, str(tmp_path / "b"), 3)
    assert got[0] == pytest.approx(ref, rel=1e-6)


@pytest.mark.timeout(180)
def test_cli_under_torchrun_matches_in_process_run(tmp_path):
    """Smoke: the real console entry point spawning 2 ranks via torchrun's API."""
    overrides = [*OPTS["adamw"], "data.micro_batch=3", "distributed.nproc=2", "distributed.zero_stage=1"]
    out = tmp_path / "cli"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dist_opt", "train", *_as_yaml_file(tmp_path), *BASE,
                           f"run.out_dir={out}", *overrides], capture_output=True, text=True, timeout=170, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dist-opt summary:" in proc.stdout and "steps 20" in proc.stdout
    got = torch.load(out / "final_params.pt", weights_only=True)
    ref = fit_single(str(tmp_path / "ref"), [*OPTS["adamw"], "data.micro_batch=12"])
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


def _as_yaml_file(tmp_path: Path) -> list[str]:
    p = tmp_path / "empty.yaml"
    p.write_text("{}\n")
    return [str(p)]
