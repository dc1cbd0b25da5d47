"""``distributed.overlap_param_gather`` through the trainer: the same parameters, metrics and
checkpoints bit for bit as the blocking all-gather, and it is refused where it does not exist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_opt.config import load_config
from dist_opt.integrations import check_engine
from dist_opt.trainer import Trainer

BASE = [
    "task.name=synthetic",
    "task.dim=6",
    "task.hidden=10",
    "task.classes=4",
    "data.global_batch=12",
    "data.micro_batch=3",
    "train.steps=8",
    "train.progress=false",
    "tracking.wandb.mode=disabled",
    "train.eval_every=3",
    "task.eval_size=32",
    "optimizer.name=lamb",
    "optimizer.lr=0.01",
    "optimizer.weight_decay=0.01",
    "distributed.zero_stage=2",
    "distributed.bucket_mb=0.0001",  # several buckets: the forward waits bucket by bucket
    "checkpoint.every_steps=4",
]


def fit(rank: int, world: int, out_dir: str, overlap: bool) -> dict:
    cfg = load_config(None, [*BASE, f"run.out_dir={out_dir}", f"distributed.overlap_param_gather={overlap}"])
    trainer = Trainer(cfg, torch.device("cpu"))
    gather = trainer.opt._pgather  # the engine's parameter all-gather (zero_stage 2)
    assert gather is not None and gather.overlap == overlap and len(gather.layout.buckets) > 1
    trainer.fit()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _losses(run_dir: Path) -> list[tuple[int, float, float | None]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("eval/loss")) for r in rows if "step" in r]


@pytest.mark.timeout(240)
def test_overlapped_gather_trains_evaluates_and_checkpoints_bitwise_like_the_blocking_one(tmp_path, world2):
    blocking = world2.run(fit, str(tmp_path / "blocking"), False)
    overlapped = world2.run(fit, str(tmp_path / "overlap"), True)
    for rank in range(2):
        assert blocking[rank].keys() == overlapped[rank].keys()
        for k in blocking[rank]:
            assert torch.equal(blocking[rank][k], overlapped[rank][k]), (rank, k)
    assert _losses(tmp_path / "blocking") == _losses(tmp_path / "overlap")
    for name in ("final_params.pt",):
        a = torch.load(tmp_path / "blocking" / name, weights_only=True)
        b = torch.load(tmp_path / "overlap" / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    steps = sorted(
        p.name for p in (tmp_path / "overlap" / "checkpoints").iterdir() if p.name.startswith("step-")
    )
    assert steps == sorted(
        p.name for p in (tmp_path / "blocking" / "checkpoints").iterdir() if p.name.startswith("step-")
    )
    assert steps, "no checkpoint written"


def test_overlap_is_refused_outside_the_native_engine() -> None:
    cfg = load_config(None, ["distributed.engine=fsdp2", "distributed.overlap_param_gather=true"])
    problems = check_engine(cfg)
    assert any(p.startswith("distributed.overlap_param_gather:") for p in problems), problems
