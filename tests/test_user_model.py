"""Users' own models and data: a Task named by import path and a DatasetTask through ``fit``, on
1/2/3 ranks, under the CLI's local spawn and under torchrun, with exact resharded resume;
BatchNorm buffers kept identical on every rank; OneCycleLR momentum cycling; frozen and tied weights."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from harness import run_ok

import dist_opt
from dist_opt.checkpoint import store

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
pytestmark = pytest.mark.dist

BASE = [
    "data.global_batch=12",
    "train.steps=12",
    "train.progress=false",
    "tracking.wandb.mode=disabled",
    "train.eval_every=6",
    "optimizer.name=adamw",
    "optimizer.lr=0.02",
    "optimizer.weight_decay=0.01",
]
IMPORTED = ["task.name=user_tasks:LNTask", "task.options={dim: 6, classes: 3}"]


def _params(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "final_params.pt", weights_only=True)


def _close(got: dict, ref: dict, what: str) -> None:
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(
            got[k], ref[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{what} {k}: {m}"
        )


def _trainer_fit(
    rank: int, world: int, out_dir: str, overrides: list[str], task_fn: str | None = None
) -> dict:
    """One rank of a run (harness worker or this process), the user task built here if named."""
    import user_tasks

    from dist_opt.config import load_config
    from dist_opt.trainer import Trainer

    cfg = load_config(None, [*BASE, f"run.out_dir={out_dir}", *overrides])
    task = getattr(user_tasks, task_fn)() if task_fn else None
    trainer = Trainer(cfg, torch.device("cpu"), task=task)
    trainer.fit()
    return {
        "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "buffers": {k: b.detach().clone() for k, b in trainer.model.named_buffers()},
    }


def _single(out_dir: Path, overrides: list[str], task_fn: str | None = None) -> dict:
    from dist_opt.dist.env import detect
    from dist_opt.dist.group import destroy_process_group, init_process_group

    init_process_group(detect({}), "gloo", 60)
    try:
        return _trainer_fit(0, 1, str(out_dir), overrides, task_fn)
    finally:
        destroy_process_group()


@pytest.fixture(scope="module")
def ds_reference(tmp_path_factory) -> dict:
    """The DatasetTask of user_tasks.ln_dataset_task trained as one process, no DataLoader workers."""
    out = tmp_path_factory.mktemp("dsref") / "run"
    return _single(out, ["data.micro_batch=12", "data.num_workers=0"], task_fn="ln_dataset_task")["params"]


@pytest.fixture(scope="module")
def ln_reference(tmp_path_factory) -> dict:
    return _single(tmp_path_factory.mktemp("ref") / "run", [*IMPORTED, "data.micro_batch=12"])["params"]


def test_task_by_import_path_on_2_and_3_ranks_equals_one_process(tmp_path, world2, world3, ln_reference):
    two = world2.run(
        _trainer_fit, str(tmp_path / "w2"), [*IMPORTED, "data.micro_batch=3", "distributed.zero_stage=2"]
    )
    factory = ["task.name=user_tasks:build_ln_task", "task.options={dim: 6, classes: 3}"]
    three = world3.run(
        _trainer_fit, str(tmp_path / "w3"), [*factory, "data.micro_batch=4", "distributed.zero_stage=1"]
    )
    for label, per_rank in (("2 ranks", two), ("3 ranks (factory)", three)):
        for rank, res in enumerate(per_rank):
            _close(res["params"], ln_reference, f"{label} rank {rank}")


def _user_dir(tmp_path: Path) -> Path:
    """A directory as a user has it: their module and a config, nothing else."""
    d = tmp_path / "project"
    d.mkdir()
    shutil.copy(TESTS / "user_tasks.py", d / "my_tasks.py")
    return d


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "WARNING"}
    env["PYTHONPATH"] = str(ROOT)  # dist_opt from this checkout; NOT the tests directory
    return env


@pytest.mark.timeout(240)
def test_cli_local_spawn_trains_a_task_named_by_import_path(tmp_path, ln_reference):
    d = _user_dir(tmp_path)
    (d / "cfg.yaml").write_text("task:\n  name: my_tasks:LNTask\n  options: {dim: 6, classes: 3}\n")
    out = d / "runs" / "cli"
    run_ok(
        [
            sys.executable,
            "-m",
            "dist_opt",
            "train",
            "cfg.yaml",
            *BASE,
            f"run.out_dir={out}",
            "data.micro_batch=6",
            "distributed.nproc=2",
        ],
        cwd=d,
        env=_env(),
        timeout=220,
    )
    _close(_params(out), ln_reference, "dist-opt train, 2 ranks")


SCRIPT = textwrap.dedent("""
    import sys
    import dist_opt
    import my_tasks

    task = my_tasks.ln_dataset_task()
    dist_opt.fit({"run": {"out_dir": sys.argv[1]}}, task, overrides=sys.argv[2:])
""")


def _torchrun(d: Path, nproc: int, out: Path, overrides: list[str]) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "train_script.py",
        str(out),
        *BASE,
        *overrides,
    ]
    run_ok(cmd, cwd=d, env=_env(), timeout=200)


@pytest.mark.timeout(420)
def test_fit_script_under_torchrun_with_workers_and_resharded_resume(tmp_path, ds_reference):
    """A DatasetTask read through DataLoader workers: 2 ranks under torchrun equal one process
    without workers; resuming its step-6 checkpoint on 1 and on 3 ranks ends at the same weights."""
    d = _user_dir(tmp_path)
    (d / "train_script.py").write_text(SCRIPT)
    full = d / "runs" / "full"
    _torchrun(
        d,
        2,
        full,
        ["data.micro_batch=6", "data.num_workers=2", "distributed.zero_stage=2", "checkpoint.every_steps=6"],
    )
    _close(_params(full), ds_reference, "torchrun 2 ranks, 2 workers")
    ckpt = store.step_dir(store.checkpoints_dir(full), 6)
    assert ckpt.is_dir()
    one = d / "runs" / "resume1"
    run_ok(
        [
            sys.executable,
            "train_script.py",
            str(one),
            *BASE,
            "data.micro_batch=12",
            "data.num_workers=2",
            "distributed.nproc=1",
            f"resume={ckpt}",
        ],
        cwd=d,
        env=_env(),
        timeout=200,
    )
    _close(_params(one), _params(full), "resumed on 1 rank")
    three = d / "runs" / "resume3"
    _torchrun(
        d,
        3,
        three,
        ["data.micro_batch=4", "data.num_workers=2", "distributed.zero_stage=1", f"resume={ckpt}"],
    )
    _close(_params(three), _params(full), "resumed on 3 ranks")


@pytest.mark.timeout(240)
def test_dist_opt_launch_runs_a_user_script_on_every_rank(tmp_path, ds_reference):
    d = _user_dir(tmp_path)
    (d / "train_script.py").write_text(SCRIPT)
    out = d / "runs" / "launched"
    cmd = [
        sys.executable,
        "-m",
        "dist_opt",
        "launch",
        "--launcher",
        "torchrun",
        "--nproc-per-node",
        "2",
        "--script",
        "train_script.py",
        "--",
        str(out),
        *BASE,
        "data.micro_batch=6",
    ]
    run_ok(cmd, cwd=d, env=_env(), timeout=220)
    _close(_params(out), ds_reference, "dist-opt launch --script, 2 ranks")


def test_batchnorm_buffers_identical_on_every_rank_and_swa_refresh_works(tmp_path, world2):
    ov = [
        "data.micro_batch=3",
        "distributed.zero_stage=1",
        "swa.enabled=true",
        "swa.start_epoch=0",
        "train.steps=null",
        "train.epochs=3",
        "data.global_batch=24",
        "checkpoint.at_end=false",
    ]
    res = world2.run(_trainer_fit, str(tmp_path / "bn"), ov, "bn_dataset_task")
    for k in res[0]["buffers"]:
        assert torch.equal(res[0]["buffers"][k], res[1]["buffers"][k]), (
            f"BatchNorm buffer {k} differs across ranks"
        )
    assert res[0]["buffers"]["bn.num_batches_tracked"] > 0
    swa = torch.load(tmp_path / "bn" / "swa_model.pt", weights_only=True)
    assert not torch.equal(
        swa["bn.running_mean"], res[0]["buffers"]["bn.running_mean"]
    )  # refreshed for the average


def _one_cycle(rank: int, world: int) -> dict:
    import user_tasks
    from torch.optim.lr_scheduler import OneCycleLR

    torch.manual_seed(0)
    model = user_tasks.LNNet()
    out = {}
    for name in ("momentum", "adamw"):
        m = user_tasks.LNNet()
        m.load_state_dict(model.state_dict())
        opt = dist_opt.ShardedOptimizer(m.named_parameters(), name, lr=0.01, zero_stage=1)
        sched = OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=True)
        seen = []
        for _ in range(5):
            x = torch.randn(8, 6)
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            g = opt.param_groups[0]
            seen.append(g["momentum"] if "momentum" in g else g["betas"][0])
        out[name] = seen
    return out


def test_one_cycle_lr_cycles_momentum_of_a_sharded_optimizer(world2):
    res = world2.run(
        _one_cycle,
    )
    for name in ("momentum", "adamw"):
        seen = res[0][name]
        assert seen == res[1][name]
        assert seen[0] > seen[-1] and len(set(seen)) == len(seen)  # OneCycle lowers momentum while lr rises


def _tied_and_frozen(rank: int, world: int) -> dict:
    import user_tasks

    torch.manual_seed(0)
    ref_model = user_tasks.TiedNet()
    model = user_tasks.TiedNet()
    model.load_state_dict(ref_model.state_dict())
    frozen0 = model.frozen.weight.detach().clone()
    opt = dist_opt.ShardedOptimizer(model.named_parameters(), "sgd", lr=0.1, zero_stage=2)
    ref_opt = torch.optim.SGD([p for p in ref_model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        x = torch.randn(8, 6, generator=g)
        for m, o in ((model, opt), (ref_model, ref_opt)):
            part = x.chunk(world)[rank] if m is model else x
            m(part).square().mean().backward()
            o.step()
            o.zero_grad()
    return {
        "frozen_unchanged": torch.equal(model.frozen.weight, frozen0),
        "tied": model.emb.weight.detach().clone(),
        "ref": ref_model.emb.weight.detach().clone(),
    }


def test_frozen_parameter_never_changes_and_tied_weight_is_updated_once(world2):
    for r in world2.run(_tied_and_frozen):
        assert r["frozen_unchanged"]
        torch.testing.assert_close(r["tied"], r["ref"], rtol=1e-5, atol=1e-6)
