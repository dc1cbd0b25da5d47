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
from dist_opt.data.sampler import GlobalBatchSampler
from dist_opt.extensions import Extension
from dist_opt.tasks.synthetic import SyntheticTask
from dist_opt.trainer import Trainer

BASE = [
    "task.name=synthetic",
    "task.dim=6",
    "task.hidden=10",
    "task.classes=4",
    "data.global_batch=12",
    "train.steps=20",
    "train.progress=false",
    "tracking.wandb.mode=disabled",
    "train.eval_every=10",
    "optimizer.weight_decay=0.01",
    "task.eval_size=64",
]


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


OPTS = {
    "sgd": ["optimizer.name=sgd", "optimizer.lr=0.2"],
    "adamw": ["optimizer.name=adamw", "optimizer.lr=0.01"],
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("opt", list(OPTS))
def test_two_and_three_ranks_equal_one_process(tmp_path, world2, world3, opt):
    ref = fit_single(str(tmp_path / "ref"), [*OPTS[opt], "data.micro_batch=12"])
    runs = {
        "2 ranks": world2.run(fit, str(tmp_path / "w2"), [*OPTS[opt], "data.micro_batch=6"]),
        "2 ranks x 3 accumulation": world2.run(
            fit, str(tmp_path / "w2a"), [*OPTS[opt], "data.micro_batch=2"]
        ),
        "2 ranks, zero stage 2 + accumulation": world2.run(
            fit, str(tmp_path / "w2z"), [*OPTS[opt], "data.micro_batch=3", "distributed.zero_stage=2"]
        ),
        "3 ranks": world3.run(fit, str(tmp_path / "w3"), [*OPTS[opt], "data.micro_batch=4"]),
    }
    for label, per_rank in runs.items():
        for rank, params in enumerate(per_rank):
            for k in ref:
                torch.testing.assert_close(
                    params[k],
                    ref[k],
                    rtol=1e-5,
                    atol=1e-6,
                    msg=lambda m, k=k, label=label, rank=rank: f"{label} rank {rank} {k}: {m}",
                )


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


class RecordingTask(SyntheticTask):
    """The synthetic task, drawing its batches through its own train_batches: it records every index
    tensor it gets, counts the streams opened, and (``prefetch``) reads one micro-batch ahead."""

    def __init__(self, *args, prefetch: bool = False) -> None:
        super().__init__(*args)
        self.prefetch, self.seen, self.streams = prefetch, [], 0

    def train_batches(self, index_batches):
        self.streams += 1
        it = iter(index_batches)
        if not self.prefetch:
            for idx in it:
                self.seen.append(idx.clone())
                yield self.train_batch(idx)
            return
        ahead = next(it)
        for idx in it:
            self.seen.append(ahead.clone())
            current, ahead = self.train_batch(ahead), idx  # the next indices were already taken
            yield current


@pytest.fixture
def world_one():
    from dist_opt.dist.env import detect
    from dist_opt.dist.group import destroy_process_group, init_process_group

    init_process_group(detect({}), "gloo", 60)
    yield
    destroy_process_group()


def _recording_trainer(out_dir: Path, prefetch: bool = False) -> Trainer:
    cfg = load_config(
        None,
        [*BASE, "optimizer.name=sgd", "optimizer.lr=0.1", "data.micro_batch=4", f"run.out_dir={out_dir}"],
    )
    return Trainer(cfg, torch.device("cpu"), task=RecordingTask(cfg.task, cfg.run.seed, prefetch=prefetch))


def test_data_flows_through_the_task_iterator_and_restarts_at_a_resumed_step(tmp_path, world_one):
    a = _recording_trainer(tmp_path / "a")
    for _ in range(4):
        a.train_step()
    expect = [
        GlobalBatchSampler.split(a.sampler.global_indices(t), 0, 1, 4, k) for t in range(4) for k in range(3)
    ]
    assert a.task.streams == 1 and len(a.task.seen) == 12  # one stream, one batch per micro-step (12 = 3 x 4)
    assert all(torch.equal(x, y) for x, y in zip(a.task.seen, expect, strict=True))

    state = a.state_dict()
    assert state == {"step": 4, "samples": 48, "consecutive_skips": 0, "run_id": None}
    b = _recording_trainer(tmp_path / "b")
    b.load_state_dict({**state, "step": 2, "samples": 24, "run_id": "abc"})
    assert (b.step, b.samples, b.run_id, b.resumed_from_step) == (2, 24, "abc", 2)
    b.train_step()
    assert b.task.streams == 1 and b.step == 3 and b.state_dict()["samples"] == 36
    assert all(torch.equal(x, y) for x, y in zip(b.task.seen, expect[6:9], strict=True))
    a.load_state_dict({**a.state_dict(), "step": 1})  # moving the step restarts the stream there
    a.train_step()
    assert a.task.streams == 2 and all(
        torch.equal(x, y) for x, y in zip(a.task.seen[12:], expect[3:6], strict=True)
    )


def test_a_prefetching_train_batches_gives_the_same_run(tmp_path, world_one):
    runs = {}
    for prefetch in (False, True):
        tr = _recording_trainer(tmp_path / str(prefetch), prefetch=prefetch)
        tr.fit()
        runs[prefetch] = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
        assert tr.task.streams == 1
    for k, v in runs[False].items():
        assert torch.equal(v, runs[True][k]), k


def test_request_stop_keeps_the_first_reason_and_stops_after_the_step(tmp_path, world_one):
    from dist_opt.trainer import StopRun

    tr = _recording_trainer(tmp_path / "s")

    class StopAt3(Extension):
        name = "stop_at_3"

        def after_step(self, trainer, metrics):
            if trainer.step == 3:
                trainer.request_stop("first")
                trainer.request_stop("second")

        def on_stop(self, trainer, reason):
            self.reason = reason

    ext = StopAt3()
    tr.extensions.append(ext)
    with pytest.raises(StopRun, match="first"):
        tr.fit()
    assert tr.step == 4 and ext.reason == "first"  # agreed in step 4's all-reduce, stopped after it


@pytest.mark.timeout(180)
def test_cli_under_torchrun_matches_in_process_run(tmp_path):
    """Smoke: the real console entry point spawning 2 ranks via torchrun's API."""
    overrides = [*OPTS["adamw"], "data.micro_batch=3", "distributed.nproc=2", "distributed.zero_stage=1"]
    out = tmp_path / "cli"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_opt",
            "train",
            *_as_yaml_file(tmp_path),
            *BASE,
            f"run.out_dir={out}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        timeout=170,
        env=env,
    )
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
