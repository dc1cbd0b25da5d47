"""dist-opt's DCP checkpoints under the fsdp2 and DeepSpeed ZeRO-1/2 engines: save at step 3 of 6,
resume on the same world size (bit-equal to the uninterrupted run), reshard to 3 ranks (continues
to the same parameters up to the reduction order of a different accumulation split).

One Trainer run per behaviour on the module's gloo worlds: a 6-step run saving at steps 3 and 6,
a resume from step 3 on 2 ranks, a resume from step 3 on 3 ranks."""

from __future__ import annotations

import pytest
import torch

from dist_opt.config import load_config
from dist_opt.integrations import full_state_dict

# dim 5 / hidden 9 / 3 classes: parameters of 45, 9, 27 and 3 elements split unevenly over 2 and 3 ranks
BASE = [
    "task.name=synthetic",
    "task.dim=5",
    "task.hidden=9",
    "task.classes=3",
    "task.eval_size=32",
    "data.global_batch=12",
    "data.micro_batch=2",
    "train.steps=6",
    "train.progress=false",
    "train.eval_max_samples=32",
    "tracking.wandb.mode=disabled",
    "optimizer.name=adamw",
    "optimizer.lr=0.01",
    "optimizer.weight_decay=0.01",
    "optimizer.max_grad_norm=0.6",
]
ENGINES = {
    "fsdp2": ["distributed.engine=fsdp2"],
    "deepspeed zero 1": ["distributed.engine=deepspeed", "distributed.zero_stage=1"],
    "deepspeed zero 2": ["distributed.engine=deepspeed", "distributed.zero_stage=2"],
}


def fit(rank: int, world: int, out_dir: str, overrides: list[str]) -> dict:
    from dist_opt.train import Trainer

    cfg = load_config(None, [*BASE, f"run.out_dir={out_dir}", *overrides])
    trainer = Trainer(cfg, torch.device("cpu"))
    summary = trainer.fit()
    return {
        "params": full_state_dict(trainer.model),
        "steps": summary.steps,
        "applied": trainer.opt.applied_steps,
    }


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", list(ENGINES))
def test_engine_checkpoint_resumes_exactly_and_reshards(tmp_path, world2, world3, engine):
    """(ZeRO-1 and ZeRO-2 share the partition code: only ZeRO-2 and fsdp2 are resharded, to save time.)"""
    eng = ENGINES[engine]
    first = tmp_path / "first"
    straight = world2.run(fit, str(first), [*eng, "checkpoint.every_steps=3", "checkpoint.at_end=false"])[0]
    assert straight["steps"] == 6
    step3 = first / "checkpoints" / "step-3"
    assert (step3 / "COMPLETE").exists()
    resumed = world2.run(fit, str(tmp_path / "again"), [*eng, f"resume={step3}", "checkpoint.at_end=false"])
    for r in resumed:
        assert r["applied"] == 6
        for k, v in straight["params"].items():
            torch.testing.assert_close(r["params"][k], v, rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    if engine == "deepspeed zero 1":
        return
    wider = world3.run(fit, str(tmp_path / "three"), [*eng, f"resume={step3}", "checkpoint.at_end=false"])
    for r in wider:
        assert r["applied"] == 6
        for k, v in straight["params"].items():
            torch.testing.assert_close(
                r["params"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
            )
