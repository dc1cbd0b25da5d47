"""The Python entry ``dist_opt.api.fit``: a user's own Task trained as a world of one equals a plain
torch loop; the same script under torchrun with 2 ranks, and started as a plain script that spawns its
own 2 ranks, ends with the parameters of the world of one; bad configs raise ConfigError."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from harness import run_ok
from torch import nn

from dist_opt.api import fit, resolve_config
from dist_opt.config import ConfigError
from dist_opt.data.sampler import GlobalBatchSampler
from dist_opt.tasks.base import Task

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


class TinyRegression(Task):
    """A user's task: linear regression on a fixed random dataset (a pure function of the seed)."""

    name = "tiny_regression"
    has_accuracy = False

    def __init__(self, seed: int = 0, n_train: int = 96, n_eval: int = 40, dim: int = 5):
        g = torch.Generator().manual_seed(seed)
        self.dim = dim
        w = torch.randn(dim, 1, generator=g)
        self.x = torch.randn(n_train + n_eval, dim, generator=g)
        self.y = self.x @ w + 0.1 * torch.randn(n_train + n_eval, 1, generator=g)
        self.n_train, self.n_eval = n_train, n_eval
        self.pulled = 0  # batches this process drew through train_batches

    def build_model(self) -> nn.Module:
        g = torch.Generator().manual_seed(1234)  # its own generator: the same model on every rank
        model = nn.Linear(self.dim, 1)
        with torch.no_grad():
            model.weight.copy_(0.3 * torch.randn(model.weight.shape, generator=g))
            model.bias.zero_()
        return model

    @property
    def train_size(self) -> int:
        return self.n_train

    def train_batch(self, indices: torch.Tensor):
        return self.x[indices], self.y[indices]

    def train_batches(self, index_batches):
        for batch in super().train_batches(index_batches):
            self.pulled += 1
            yield batch

    @property
    def eval_size(self) -> int:
        return self.n_eval

    def eval_batch(self, indices: torch.Tensor):
        return self.x[self.n_train + indices], self.y[self.n_train + indices]

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return (model(x) - y).square().mean()

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch) -> dict[str, float]:
        x, y = batch
        return {"loss_sum": float((model(x) - y).square().sum()), "count": float(len(x))}


def config(out_dir: Path | str, nproc: int = 1) -> dict:
    return {
        "data": {"global_batch": 16, "micro_batch": 4},
        "train": {"steps": 12, "progress": False, "eval_every": 6},
        "optimizer": {"name": "sgd", "lr": 0.1},
        "checkpoint": {"at_end": False},
        "tracking": {"wandb": {"mode": "disabled"}},
        "distributed": {"nproc": nproc},
        "run": {"out_dir": str(out_dir), "seed": 3},
    }


def plain_torch_reference(steps: int = 12) -> dict[str, torch.Tensor]:
    """The same training as a plain torch loop: full global batch per step, torch.optim.SGD."""
    task = TinyRegression()
    model = task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = GlobalBatchSampler(task.train_size, 16, 3)
    for step in range(steps):
        opt.zero_grad()
        task.loss(model, task.train_batch(sampler.global_indices(step))).backward()
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_user_task_as_a_world_of_one_equals_a_plain_torch_loop(tmp_path):
    task = TinyRegression()
    summary = fit(config(tmp_path / "run"), task=task, overrides=["train.eval_every=4"])
    assert summary.steps == 12 and summary.samples == 12 * 16
    assert task.pulled == 12 * 4  # one batch per micro-step (16 = 4 micro-steps of 4), through train_batches
    assert set(summary.eval) == {"eval/loss"}
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/loss" in r and "step" in r] == [4, 8, 12]  # the override applied
    got = torch.load(tmp_path / "run" / "final_params.pt", weights_only=True)
    ref = plain_torch_reference()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_config_forms_and_bad_configs(tmp_path):
    as_dict = config(tmp_path)
    cfg = resolve_config(as_dict, ["optimizer.lr=0.5"])
    assert cfg.optimizer.lr == 0.5 and cfg.data.global_batch == 16
    assert (
        resolve_config(cfg) == cfg and resolve_config(cfg) is not cfg
    )  # a copy: fit may name the task in it
    assert resolve_config(cfg, ["train.steps=3"]).train.steps == 3
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  global_batch: 32\n")
    assert resolve_config(path, ["data.micro_batch=8"]).data.micro_batch == 8
    with pytest.raises(ConfigError, match="optimizer.lr"):
        fit({**as_dict, "optimizer": {"name": "sgd", "lr": -1.0}}, task=TinyRegression())
    with pytest.raises(ConfigError, match="unknown key"):
        fit(as_dict, task=TinyRegression(), overrides=["train.stepz=3"])
    with pytest.raises(ConfigError, match="file not found"):
        fit(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="data.global_batch"):  # 16 is not divisible by 3 x 2
        fit(as_dict, task=TinyRegression(), overrides=["data.micro_batch=3", "distributed.nproc=2"])
    with pytest.raises(ConfigError, match="config: expected"):
        fit(42)  # type: ignore[arg-type]


def test_several_ranks_without_a_script_to_rerun_is_a_clear_error(tmp_path):
    """Under pytest there is no user script: fit must not re-run the test runner in N ranks."""
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2"):
        fit(config(tmp_path, nproc=2), task=TinyRegression())


SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from test_api import TinyRegression
from dist_opt.api import fit

task = TinyRegression()
summary = fit({cfg!r}, task=task, overrides=sys.argv[1:])
import torch.distributed as dist  # the group is gone again; the rank is in the launcher's environment
import os
rank = int(os.environ["RANK"])
with open({out!r} + f"/summary-rank{{rank}}.json", "w") as f:
    json.dump({{"steps": summary.steps, "eval": summary.eval, "pulled": task.pulled,
               "initialized": dist.is_initialized()}}, f)
"""


def write_script(tmp_path: Path, out: Path, nproc: int) -> Path:
    out.mkdir(parents=True)
    script = tmp_path / "user_train.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), cfg=config(out / "run", nproc=nproc), out=str(out)))
    return script


def script_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled", LOGLEVEL="WARNING")
    return env


def assert_two_ranks_equal_world_of_one(out: Path, tmp_path: Path) -> None:
    got = torch.load(out / "run" / "final_params.pt", weights_only=True)
    one = fit(config(tmp_path / "one"), task=TinyRegression())
    ref = torch.load(tmp_path / "one" / "final_params.pt", weights_only=True)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
    per_rank = [json.loads((out / f"summary-rank{r}.json").read_text()) for r in range(2)]
    for s in per_rank:  # every rank gets the summary; each drew its own 2 micro-batches per step
        assert s["steps"] == 12 and s["pulled"] == 12 * 2 and not s["initialized"]
        assert s["eval"]["eval/loss"] == pytest.approx(one.eval["eval/loss"], rel=1e-5)
    assert not (out / "summary-rank2.json").exists()


@pytest.mark.timeout(240)
def test_user_script_under_torchrun_equals_the_world_of_one(tmp_path):
    out = tmp_path / "torchrun"
    script = write_script(tmp_path, out, nproc=1)  # distributed.nproc is ignored under a launcher
    run_ok(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        env=script_env(),
        cwd=tmp_path,
        timeout=220,
    )
    assert_two_ranks_equal_world_of_one(out, tmp_path)


@pytest.mark.timeout(240)
def test_plain_script_with_nproc_2_reruns_itself_in_two_ranks(tmp_path):
    out = tmp_path / "spawned"
    script = write_script(tmp_path, out, nproc=2)
    proc = run_ok(
        [sys.executable, str(script), "train.eval_every=6"],
        env=script_env(),
        cwd=tmp_path,
        timeout=220,
    )
    assert "dist-opt summary:" in proc.stdout  # printed by rank 0 of the re-run script
    assert_two_ranks_equal_world_of_one(out, tmp_path)
