"""The same optimizers inside DeepSpeed and over FSDP2 (distributed.engine = deepspeed | fsdp2).

Reference: the native engine on the same 2 gloo ranks, same config and seed (itself equal to one
process, see test_train / test_engine_exact). Every run uses gradient accumulation (2 micro-steps),
clipping that triggers on some steps, weight decay, and layers whose sizes do not split evenly
over 2 ranks.

Tolerance (rtol 1e-5, atol 1e-6 on parameters after 20 steps; the trust ratios of every step to
rtol 1e-5): the engines compute the same math in fp32 but add in different orders -- DeepSpeed
scales each micro-step's output gradient by 1/accumulation and divides after its bucketed
all-reduce, FSDP2 reduce-scatters a sum then divides, the native engine sums everything then
divides once, and the norms of sharded layers are partial sums -- so gradients differ in the last
bits (~1e-7 relative), which 20 optimizer steps carry into the parameters at about that size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_opt.config import ConfigError, load_config
from dist_opt.extensions import Extension
from dist_opt.integrations import check_engine, full_state_dict
from dist_opt.integrations.deepspeed import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
# dim 5 / hidden 9 / 3 classes: every parameter (45, 9, 27, 3 elements; 9 and 3 rows) splits unevenly
BASE = [
    "task.name=synthetic",
    "task.dim=5",
    "task.hidden=9",
    "task.classes=3",
    "task.eval_size=64",
    "data.global_batch=12",
    "data.micro_batch=3",
    "train.steps=20",
    "train.progress=false",
    "tracking.wandb.mode=disabled",
    "optimizer.weight_decay=0.01",
    "optimizer.max_grad_norm=0.6",
    "checkpoint.at_end=false",
    "train.eval_max_samples=64",
]
OPTS = {
    "adamw": ["optimizer.name=adamw", "optimizer.lr=0.01"],
    "lamb": ["optimizer.name=lamb", "optimizer.lr=0.01"],
    "lars": ["optimizer.name=lars", "optimizer.lr=0.5"],
    "shampoo": ["optimizer.name=shampoo", "optimizer.lr=0.01", "optimizer.precondition_frequency=3"],
}
ENGINES = {
    "deepspeed zero 0": ["distributed.engine=deepspeed", "distributed.zero_stage=0"],
    "deepspeed zero 1": ["distributed.engine=deepspeed", "distributed.zero_stage=1"],
    "deepspeed zero 2": ["distributed.engine=deepspeed", "distributed.zero_stage=2"],
    "fsdp2": ["distributed.engine=fsdp2"],
}
SUPPORTED = {
    "adamw": list(ENGINES),
    "lamb": ["deepspeed zero 0", "fsdp2"],
    "lars": ["deepspeed zero 0", "fsdp2"],
    "shampoo": ["deepspeed zero 0"],
}
TOL = {"rtol": 1e-5, "atol": 1e-6}


class Recorder(Extension):
    """Keeps what each step's optimizer reported (trust ratios, clipping, skips)."""

    def __init__(self) -> None:
        self.trust: list[torch.Tensor] = []
        self.clipped = 0
        self.noise_steps = 0

    def after_step(self, trainer, metrics) -> None:
        st = trainer.opt.last_stats
        if "trust_ratios" in st:
            self.trust.append(st["trust_ratios"].clone())
        self.clipped += int(st.get("grad_norm", 0.0) > 0.6)  # every engine reports the unclipped norm
        self.noise_steps += int("local_grad_sq" in st)


def fit(rank: int, world: int, out_dir: str, overrides: list[str]) -> dict:
    from dist_opt.train import Trainer

    cfg = load_config(None, [*BASE, f"run.out_dir={out_dir}", *overrides])
    trainer = Trainer(cfg, torch.device("cpu"))
    init = full_state_dict(trainer.model)
    rec = Recorder()
    trainer.extensions.append(rec)
    summary = trainer.fit()
    out = {
        "params": full_state_dict(trainer.model),
        "init": init,
        "trust": rec.trust,
        "clipped": rec.clipped,
        "noise_steps": rec.noise_steps,
        "skipped": summary.skipped,
        "steps": summary.steps,
    }
    opt = trainer.opt
    if cfg.distributed.engine == "fsdp2":
        out["local_param_numel"] = sum(p.to_local().numel() for p in trainer.model.parameters())
        out["param_numel"] = sum(p.numel() for p in trainer.model.parameters())
    if hasattr(opt, "state_bytes") or hasattr(getattr(opt, "client", None), "state_bytes"):
        out["state_bytes"] = (opt.state_bytes if hasattr(opt, "state_bytes") else opt.client.state_bytes)()
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("opt", list(OPTS))
def test_engines_end_with_the_native_parameters(tmp_path, world2, opt):
    ref = world2.run(fit, str(tmp_path / "native"), OPTS[opt])
    moved = max(float((ref[0]["params"][k] - ref[0]["init"][k]).abs().max()) for k in ref[0]["params"])
    assert moved > 1e3 * TOL["atol"], "the reference run must actually train"
    assert 0 < ref[0]["clipped"] < 20, "clipping must trigger on some steps but not all"
    for label in SUPPORTED[opt]:
        runs = world2.run(fit, str(tmp_path / label.replace(" ", "_")), [*OPTS[opt], *ENGINES[label]])
        for rank, got in enumerate(runs):
            assert got["steps"] == 20 and got["skipped"] == 0
            for k, want in ref[0]["params"].items():
                torch.testing.assert_close(
                    got["params"][k],
                    want,
                    **TOL,
                    msg=lambda m, k=k, label=label, rank=rank: f"{label} rank {rank} {k}: {m}",
                )
            assert got["clipped"] == ref[0]["clipped"], f"{label}: clipping must trigger on the same steps"
            if opt in ("lamb", "lars"):  # exact per-layer trust ratios, every step
                assert len(got["trust"]) == len(ref[0]["trust"]) == 20
                for step, (a, b) in enumerate(zip(got["trust"], ref[rank]["trust"], strict=True)):
                    torch.testing.assert_close(
                        a,
                        b,
                        rtol=1e-5,
                        atol=0.0,
                        msg=lambda m, step=step, label=label: f"{label} step {step}: {m}",
                    )
        if label == "fsdp2":  # ZeRO-3: each rank holds about half of every parameter
            total = runs[0]["param_numel"]
            assert runs[0]["local_param_numel"] + runs[1]["local_param_numel"] == total
            assert max(r["local_param_numel"] for r in runs) <= 0.6 * total
        if label == "deepspeed zero 0" and opt != "shampoo":  # dist-opt shards the state itself
            full = ref[0]["state_bytes"]  # (+ 4-byte step counters that every rank keeps)
            assert full <= runs[0]["state_bytes"] + runs[1]["state_bytes"] <= full + 64
            assert max(r["state_bytes"] for r in runs) <= full // 2 + 64
        if label == "deepspeed zero 0":  # the gradient noise scale still gets its local norms
            assert runs[0]["noise_steps"] == 20


# -- skipped steps, and checkpoints through DeepSpeed's own format and through DCP ---------------
def _tiny(cfg_overrides: list[str]):
    from torch import nn

    from dist_opt.engine.build import build_engine

    cfg = load_config(None, [*BASE, "data.global_batch=4", "data.micro_batch=2", *cfg_overrides])
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return build_engine(cfg, model, 0.05)


def _train(model, opt, steps: int, start: int, rank: int) -> None:
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(100 * s + rank)
        x, y = torch.randn(2, 4, generator=g), torch.randn(2, 3, generator=g)
        torch.nn.functional.mse_loss(model(x), y).backward()
        assert opt.step()
        opt.zero_grad()


def skip_then_step(rank: int, world: int, engine: list[str]) -> dict:
    model, opt = _tiny(engine)
    before = full_state_dict(model)
    x = torch.ones(2, 4) * (rank + 1)
    (model(x).sum() * float("nan")).backward()
    applied = opt.step()
    opt.zero_grad()
    unchanged = all(torch.equal(v, before[k]) for k, v in full_state_dict(model).items())
    skipped = opt.skipped_steps
    _train(model, opt, 1, 0, rank)
    moved = not all(torch.equal(v, before[k]) for k, v in full_state_dict(model).items())
    return {"applied": applied, "unchanged": unchanged, "skipped": skipped, "moved": moved}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("engine", ["deepspeed zero 0", "deepspeed zero 2", "fsdp2"])
def test_non_finite_step_is_skipped_on_every_rank(world2, engine):
    for r in world2.run(skip_then_step, [*OPTS["adamw"], *ENGINES[engine]]):
        assert r == {"applied": False, "unchanged": True, "skipped": 1, "moved": True}


def resume(rank: int, world: int, engine: list[str], how: str, ckpt: str) -> dict:
    """6 steps straight vs 3 steps, save, fresh engine, load, 3 steps. ``how``: "deepspeed"
    (DeepSpeed's save_checkpoint/load_checkpoint), "dcp" (DCP of the model's and optimizer's
    state_dict: DTensors under FSDP2), "memory" (state_dict / load_state_dict)."""
    import torch.distributed.checkpoint as dcp

    model, opt = _tiny(engine)
    _train(model, opt, 6, 0, rank)
    straight = full_state_dict(model)
    model, opt = _tiny(engine)
    _train(model, opt, 3, 0, rank)
    if how == "deepspeed":
        opt.save_checkpoint(ckpt, tag="t3")
    elif how == "dcp":
        dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=ckpt)
    else:
        saved = {"model": full_state_dict(model), "optim": opt.state_dict()}
    model, opt = _tiny(engine)
    if how == "deepspeed":
        opt.load_checkpoint(ckpt, tag="t3")
    elif how == "dcp":
        sd = {"model": model.state_dict(), "optim": opt.state_dict()}
        dcp.load(sd, checkpoint_id=ckpt)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])
    else:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optim"])
    assert opt.applied_steps == 3
    _train(model, opt, 3, 3, rank)
    return {"straight": straight, "resumed": full_state_dict(model)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("engine", "opt", "how"),
    [
        ("deepspeed zero 0", "lamb", "deepspeed"),
        ("deepspeed zero 0", "lamb", "memory"),
        ("deepspeed zero 2", "adamw", "deepspeed"),
        ("deepspeed zero 1", "adamw", "memory"),
        ("fsdp2", "lamb", "dcp"),
    ],
)
def test_resume_from_a_checkpoint_continues_exactly(tmp_path, world2, engine, opt, how):
    for r in world2.run(resume, [*OPTS[opt], *ENGINES[engine]], how, str(tmp_path / "ckpt")):
        for k, v in r["straight"].items():
            torch.testing.assert_close(r["resumed"][k], v, rtol=0, atol=0)


# -- config ------------------------------------------------------------------------------------
def test_generated_deepspeed_config():
    cfg = load_config(
        None,
        [
            *BASE,
            "distributed.engine=deepspeed",
            "distributed.zero_stage=2",
            "data.global_batch=24",
            "data.micro_batch=4",
            "distributed.bucket_mb=1",
            'deepspeed.config={"zero_optimization": {"overlap_comm": true}, "steps_per_print": 5}',
        ],
    )
    ds = deepspeed_config(cfg, world=3)
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (24, 4, 2)
    assert ds["zero_optimization"] == {
        "stage": 2,
        "reduce_bucket_size": 2**18,
        "allgather_bucket_size": 2**18,
        "overlap_comm": True,
    }
    assert ds["gradient_clipping"] == 0.6 and ds["zero_allow_untested_optimizer"] is True
    assert ds["managed_gradient_accumulation"] is False and ds["steps_per_print"] == 5
    # stage 0: dist-opt's client optimizer clips (DeepSpeed's default of 1.0 must be switched off)
    ds0 = deepspeed_config(load_config(None, [*BASE, "distributed.engine=deepspeed"]), world=2)
    assert ds0["gradient_clipping"] == 0.0 and ds0["zero_optimization"] == {"stage": 0}
    with pytest.raises(ConfigError, match="data.global_batch"):
        deepspeed_config(cfg, world=5)


@pytest.mark.parametrize(
    ("overrides", "field", "why"),
    [
        (
            ["distributed.engine=deepspeed", "distributed.zero_stage=1", "optimizer.name=lamb"],
            "optimizer.name",
            "flattens all parameters",
        ),
        (
            ["distributed.engine=deepspeed", "distributed.zero_stage=2", "optimizer.name=shampoo"],
            "optimizer.name",
            "flattens all parameters",
        ),
        (["distributed.engine=fsdp2", "optimizer.name=shampoo"], "optimizer.name", "span the dim-0 shards"),
        (["distributed.engine=fsdp2", "distributed.zero_stage=2"], "distributed.zero_stage", "ZeRO-3"),
        (
            ["distributed.engine=deepspeed", "deepspeed.config={train_batch_size: 8}"],
            "deepspeed.config.train_batch_size",
            "data.global_batch",
        ),
        (
            ["distributed.engine=deepspeed", "deepspeed.config={zero_optimization: {stage: 3}}"],
            "deepspeed.config.zero_optimization.stage",
            "fsdp2",
        ),
        (
            ["distributed.engine=deepspeed", "deepspeed.config={bf16: {enabled: true}}"],
            "deepspeed.config.bf16.enabled",
            "not supported",
        ),
        (["deepspeed.config={steps_per_print: 1}"], "deepspeed.config", "engine is native"),
        (["distributed.engine=deepspeed", "swa.enabled=true"], "swa.enabled", "native engine"),
        (["distributed.engine=fsdp2", "distributed.nproc=1"], "distributed.engine", "nothing to shard"),
    ],
)
def test_unsupported_combinations_are_refused_before_start(tmp_path, capsys, overrides, field, why):
    from dist_opt.train import main

    cfg = load_config(None, [*BASE, *overrides])
    problems = check_engine(cfg, cfg.distributed.nproc)
    assert len(problems) == 1 and problems[0].startswith(f"{field}: ") and why in problems[0]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    assert main([str(cfg_file), *BASE, *overrides]) == 2  # before any rank starts
    assert f"config error: {field}: " in capsys.readouterr().err


def test_supported_combinations_pass_the_check():
    for opt, engines in SUPPORTED.items():
        for label in engines:
            assert check_engine(load_config(None, [*BASE, *OPTS[opt], *ENGINES[label]])) == []
    # dist-opt's checkpoints work under every engine (tests/test_engine_checkpoints.py)
    saving = ["checkpoint.at_end=true", "checkpoint.every_steps=2", "resume=latest"]
    for label in ENGINES:
        assert check_engine(load_config(None, [*BASE, *OPTS["adamw"], *ENGINES[label], *saving])) == []


# -- the real deepspeed launcher ------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_deepspeed_launcher_runs_the_training_entry_point(tmp_path, world2):
    from dist_opt.dist.group import free_port

    overrides = [*OPTS["lamb"], *ENGINES["deepspeed zero 0"]]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    out = tmp_path / "ds"
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [
        str(launcher),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "--no_local_rank",
        "dist_opt.train",
        str(cfg_file),
        *BASE,
        f"run.out_dir={out}",
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=220, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dist-opt summary:" in proc.stdout and "steps 20 (0 skipped)" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    got = torch.load(out / "final_params.pt", weights_only=True)
    ref = world2.run(fit, str(tmp_path / "native"), OPTS["lamb"])[0]["params"]
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, **TOL)
