"""SWA (dist_opt/swa.py): one process equals torch's AveragedModel + update_bn + SWALR; 2 and 3 ranks
(ZeRO 0/1/2, accumulation) equal one process; EMA and epoch cadence equal their closed forms; the
BatchNorm refresh matters; the state reshards (2 ranks -> 1) and a resumed run equals an
uninterrupted one; bad settings are one-line config errors."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from dist_opt.config import load_config
from dist_opt.data.sampler import GlobalBatchSampler
from dist_opt.engine.partition import make_layout
from dist_opt.engine.state_codec import layout_specs
from dist_opt.extensions import Extension
from dist_opt.swa import SWAExtension, bn_batches, swalr_lr
from dist_opt.tasks import build_task, cross_entropy_sums
from dist_opt.train import StopRun, Trainer

BASE = [
    "task.name=digits",
    "task.hidden=24",
    "train.steps=null",
    "train.progress=false",
    "tracking.wandb.mode=disabled",
    "optimizer.name=momentum",
    "optimizer.lr=0.1",
    "swa.enabled=true",
]


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """A gloo group of one in this process (as the Trainer sees it under a launcher of one)."""
    from dist_opt.dist.env import detect
    from dist_opt.dist.group import destroy_process_group, init_process_group

    init_process_group(detect({}), "gloo", 60)
    try:
        yield
    finally:
        destroy_process_group()


def swa_of(trainer: Trainer) -> SWAExtension:
    return next(e for e in trainer.extensions if isinstance(e, SWAExtension))


class Snapshots(Extension):
    """Records the parameters at every epoch end (runs after the SWA extension)."""

    name = "snapshots"

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def after_epoch(self, trainer: Trainer, epoch: int) -> None:
        self.at[epoch] = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


class StopAfterEpoch(Extension):
    """Stops the run at the end of ``epoch`` and keeps what a checkpoint would hold."""

    name = "stop"

    def __init__(self, epoch: int) -> None:
        self.epoch, self.saved = epoch, None

    def after_epoch(self, trainer: Trainer, epoch: int) -> None:
        if epoch == self.epoch:
            # every rank stops here, so the stop is agreed without the next step's all-reduce
            trainer.stop_requested, trainer.stop_agreed, trainer.stop_reason = True, True, "test"

    def on_stop(self, trainer: Trainer, reason: str) -> None:
        self.saved = {
            "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "opt": trainer.opt.state_dict(),
            "schedule": trainer.schedule.state_dict(),
            "swa": swa_of(trainer).state_dict(),
            "step": trainer.step,
            "samples": trainer.samples,
        }


class ResumeFrom(Extension):
    """Restores ``StopAfterEpoch.saved`` in setup (as the checkpoint extension does)."""

    name = "resume"

    def __init__(self, saved: dict) -> None:
        self.saved = saved

    def setup(self, trainer: Trainer) -> None:
        s = self.saved
        # SWA first, schedule last (the checkpoint extension does the opposite): the schedule then
        # rewrites the lrs, and the SWA lr must still be the one the first resumed step uses
        swa_of(trainer).load_state_dict(s["swa"])
        trainer.model.load_state_dict(s["model"])  # copies into the optimizer's flat buffer (views)
        trainer.opt.load_state_dict(s["opt"])
        trainer.step, trainer.samples, trainer.resumed_from_step = s["step"], s["samples"], s["step"]
        trainer.schedule.load_state_dict(s["schedule"])


def run(
    rank: int, world: int, out_dir: str, overrides: list[str], extra: list[Extension] | None = None
) -> dict:
    """Fit a Trainer (with ``extra`` extensions after SWA); what the tests compare, per rank."""
    cfg = load_config(None, [*BASE, f"run.out_dir={out_dir}", *overrides])
    trainer = Trainer(cfg, torch.device("cpu"))
    trainer.extensions += extra or []
    try:
        trainer.fit()
    except StopRun:
        pass
    swa = swa_of(trainer)
    opt = trainer.opt
    owned_is_optimizer_shard = (
        all(
            s.valid == 0 or view.data_ptr() == opt.param_pieces()[i].data_ptr()
            for i, (s, view) in enumerate(zip(swa.specs, opt.owned_params(), strict=True))
        )
        if opt.layout.world > 1
        else None
    )
    return {
        "state": swa.state_dict(),
        "n": swa.n,
        "resumed_from_step": trainer.resumed_from_step,
        "avg_numel": swa.avg.numel(),
        "total_numel": sum(s.numel for s in swa.specs),
        "owned_is_optimizer_shard": owned_is_optimizer_shard,
        "extra": [getattr(e, "saved", None) or getattr(e, "at", None) for e in extra or []],
    }


def fit_single(out_dir: str, overrides: list[str], extra: list[Extension] | None = None) -> dict:
    with single_process():
        return run(0, 1, out_dir, overrides, extra)


def metric_rows(out_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


def load_export(out_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(out_dir / "swa_model.pt", weights_only=True)


def test_swalr_values_equal_torch_swalr():
    for strategy in ("linear", "cos"):
        for anneal in (0, 1, 3):
            opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
            sched = SWALR(opt, swa_lr=0.05, anneal_epochs=anneal, anneal_strategy=strategy)
            for j in range(6):
                got = swalr_lr(0.4, 0.05, j, anneal, strategy)
                assert got == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), (strategy, anneal, j)
                opt.step()
                sched.step()


def test_ownership_is_the_torch_chunk_split():
    for world in (1, 2, 3, 4):
        layout = make_layout([("a", (5, 3)), ("b", (4,)), ("c", (1,))], world, 100)
        for s in layout.slots:
            pieces = torch.arange(s.numel).chunk(world) if s.numel >= world else None
            got = [layout_specs(layout, r)[s.index] for r in range(world)]
            assert sum(g.valid for g in got) == s.numel and all(g.chunk == -(-s.numel // world) for g in got)
            if pieces is not None and len(pieces) == world:
                assert [(g.offset, g.end) for g in got] == [(int(p[0]), int(p[-1]) + 1) for p in pieces]
    assert bn_batches(10, 3) == [(0, 3), (3, 6), (6, 9)]  # a last batch of one sample is dropped
    assert bn_batches(11, 3)[-1] == (9, 11)


@pytest.mark.timeout(120)
def test_one_process_equals_averaged_model_update_bn_and_swalr(tmp_path):
    """Digits with BatchNorm, momentum SGD, SWALR cos annealing: export == AveragedModel + update_bn."""
    epochs, start, anneal, swa_lr, batch = 6, 2, 2, 0.03, 64
    overrides = [
        "task.batchnorm=true",
        f"data.global_batch={batch}",
        f"data.micro_batch={batch}",
        f"train.epochs={epochs}",
        f"swa.start_epoch={start}",
        f"swa.lr={swa_lr}",
        f"swa.anneal_epochs={anneal}",
        "swa.anneal_strategy=cos",
    ]
    out = tmp_path / "run"
    res = fit_single(str(out), overrides)

    cfg = load_config(None, [*BASE, *overrides])
    task = build_task(cfg.task, cfg.run.seed)
    model = task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sampler = GlobalBatchSampler(task.train_size, batch, cfg.run.seed)
    spe = sampler.steps_per_epoch
    averaged = AveragedModel(model)
    swalr, lrs = None, []
    for epoch in range(epochs):
        if epoch == start:
            swalr = SWALR(opt, swa_lr=swa_lr, anneal_epochs=anneal, anneal_strategy="cos")
        for step in range(epoch * spe, (epoch + 1) * spe):
            lrs.append(opt.param_groups[0]["lr"])
            loss = task.loss(model, task.train_batch(sampler.global_indices(step)))
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch >= start:
            averaged.update_parameters(model)
            swalr.step()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(task.x_train), batch_size=batch)
    update_bn(loader, averaged)

    assert res["n"] == epochs - start
    logged = [r["lr"] for r in metric_rows(out) if "loss" in r]
    assert logged == pytest.approx(lrs, rel=1e-12)
    got = load_export(out)
    ref = averaged.module.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(
            got[k].to(ref[k].dtype), ref[k], rtol=1e-4, atol=2e-5, msg=lambda m, k=k: f"{k}: {m}"
        )
    # the logged SWA evaluation is that of the reference averaged model
    averaged.module.eval()
    with torch.no_grad():
        sums = cross_entropy_sums(averaged.module(task.x_test), task.y_test)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["swa/eval/loss"] == pytest.approx(sums["loss_sum"] / sums["count"], rel=1e-4)
    assert summary["swa/eval/accuracy"] == pytest.approx(sums["correct"] / sums["count"], abs=1 / 360 + 1e-9)


@pytest.mark.timeout(60)
def test_ema_and_epoch_cadence_equal_closed_forms(tmp_path):
    """every_epochs=2 from epoch 1 of 6 averages epochs 1, 3, 5: swa = their mean, ema the closed form."""
    base = [
        "data.global_batch=48",
        "data.micro_batch=48",
        "train.epochs=6",
        "swa.start_epoch=1",
        "swa.every_epochs=2",
    ]
    d = 0.6
    for kind in ("swa", "ema"):
        out = tmp_path / kind
        res = fit_single(str(out), [*base, f"swa.kind={kind}", f"swa.ema_decay={d}"], [Snapshots()])
        snaps = res["extra"][0]
        w1, w3, w5 = (snaps[e] for e in (1, 3, 5))
        assert res["n"] == 3
        got = load_export(out)
        for k in w1:
            a, b, c = w1[k].double(), w3[k].double(), w5[k].double()
            ref = (a + b + c) / 3 if kind == "swa" else d * d * a + (1 - d) * d * b + (1 - d) * c
            torch.testing.assert_close(
                got[k].double(), ref, rtol=1e-6, atol=1e-6, msg=lambda m, k=k, kind=kind: f"{kind} {k}: {m}"
            )


@pytest.mark.timeout(60)
def test_bn_refresh_matters(tmp_path):
    """SWA weights with refreshed BatchNorm statistics beat the same weights with the last iterate's."""
    overrides = [
        "task.batchnorm=true",
        "task.hidden=32",
        "data.global_batch=32",
        "data.micro_batch=32",
        "train.epochs=6",
        "swa.start_epoch=2",
        "swa.lr=0.1",
    ]
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        fit_single(str(out), [*overrides, f"run.seed={seed}"])
        cfg = load_config(None, [*BASE, *overrides, f"run.seed={seed}"])
        task = build_task(cfg.task, seed)
        model = task.build_model()
        swa, live = load_export(out), torch.load(out / "final_params.pt", weights_only=True)
        stale = {
            **swa,
            **{k: v for k, v in live.items() if k.startswith(("bn1.", "bn2.")) and "running" in k},
        }
        scores = {}
        for label, sd in (("refreshed", swa), ("stale", stale)):
            model.load_state_dict(sd)
            model.eval()
            with torch.no_grad():
                s = cross_entropy_sums(model(task.x_test), task.y_test)
            scores[label] = (s["loss_sum"] / s["count"], s["correct"] / s["count"])
        assert scores["refreshed"][0] < scores["stale"][0], scores
        assert scores["refreshed"][1] >= scores["stale"][1], scores
        summary = json.loads((out / "summary.json").read_text())
        assert summary["swa/eval/loss"] == pytest.approx(scores["refreshed"][0], rel=1e-5)


SHARDED = [
    "data.global_batch=48",
    "train.epochs=4",
    "swa.start_epoch=1",
    "swa.lr=0.05",
    "swa.anneal_epochs=1",
    "swa.anneal_strategy=linear",
]


def _assert_same_state(got: dict, ref: dict, label: str) -> None:
    assert got["n"] == ref["n"] and got["base_lrs"] == pytest.approx(ref["base_lrs"], rel=1e-12), label
    for k, v in ref["averaged"].items():
        torch.testing.assert_close(
            got["averaged"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{label} {k}: {m}"
        )


@pytest.mark.timeout(180)
def test_two_and_three_ranks_equal_one_process(tmp_path, world2, world3):
    """No BatchNorm (live BN statistics are per rank by design): the average and the export match."""
    ref = fit_single(str(tmp_path / "ref"), [*SHARDED, "data.micro_batch=48"])
    ref_export = load_export(tmp_path / "ref")
    runs = {
        "2 ranks, zero 0": (world2, "w2z0", ["data.micro_batch=24", "distributed.zero_stage=0"]),
        "2 ranks, zero 2 + accumulation": (
            world2,
            "w2z2",
            ["data.micro_batch=12", "distributed.zero_stage=2"],
        ),
        "3 ranks, zero 1": (world3, "w3z1", ["data.micro_batch=16", "distributed.zero_stage=1"]),
    }
    for label, (h, name, ov) in runs.items():
        per_rank = h.run(run, str(tmp_path / name), [*SHARDED, *ov])
        world = len(per_rank)
        for rank, res in enumerate(per_rank):
            _assert_same_state(res["state"], ref["state"], f"{label} rank {rank}")
            # each rank keeps ~1/N of the parameters: ceil(numel / N) per tensor
            assert res["avg_numel"] <= res["total_numel"] / world + len(ref["state"]["averaged"]), label
            if "zero 0" not in label:
                assert res["owned_is_optimizer_shard"], label
        got = load_export(tmp_path / name)
        for k, v in ref_export.items():
            torch.testing.assert_close(
                got[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k, label=label: f"{label} {k}: {m}"
            )


@pytest.mark.timeout(120)
def test_bn_refresh_over_two_ranks_equals_one_process(tmp_path, world2):
    """With BatchNorm the runs agree when the micro-batches agree (1 process: 2 x 24 accumulated; 2 ranks:
    24 each): the BN refresh splits its batches over ranks and all-reduces their statistics."""
    ov = [*SHARDED, "task.batchnorm=true", "data.micro_batch=24"]
    fit_single(str(tmp_path / "ref"), ov)
    world2.run(run, str(tmp_path / "w2"), [*ov, "distributed.zero_stage=1"])
    ref, got = load_export(tmp_path / "ref"), load_export(tmp_path / "w2")
    assert any("running_var" in k for k in ref)
    for k, v in ref.items():
        torch.testing.assert_close(
            got[k].to(v.dtype), v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
        )
    rows = [r for r in metric_rows(tmp_path / "w2") if "swa/eval/loss" in r]
    ref_rows = [r for r in metric_rows(tmp_path / "ref") if "swa/eval/loss" in r]
    assert [r["swa/eval/loss"] for r in rows] == pytest.approx(
        [r["swa/eval/loss"] for r in ref_rows], rel=1e-5
    )


@pytest.mark.timeout(180)
def test_state_reshards_and_resume_is_exact(tmp_path, world2):
    """Stop a 2-rank run after epoch 2 (mid-annealing, 2 averages), resume on 1 process: == uninterrupted
    (state handed over directly, and through the checkpoint extension's save-on-stop and resume=latest)."""
    ov = ["data.global_batch=48", "train.epochs=6", "swa.start_epoch=1", "swa.lr=0.02", "swa.anneal_epochs=3"]
    ref = fit_single(str(tmp_path / "ref"), [*ov, "data.micro_batch=48"])
    first = world2.run(
        run,
        str(tmp_path / "a"),
        [*ov, "data.micro_batch=24", "distributed.zero_stage=2"],
        [StopAfterEpoch(2)],
    )
    saved = first[0]["extra"][0]
    assert saved["swa"]["n"] == 2 and all(
        v.numel() == first[0]["state"]["numel"][k] for k, v in saved["swa"]["averaged"].items()
    )
    resumed = fit_single(str(tmp_path / "b"), [*ov, "data.micro_batch=48"], [ResumeFrom(saved)])
    _assert_same_state(resumed["state"], ref["state"], "resumed")
    ref_export, got = load_export(tmp_path / "ref"), load_export(tmp_path / "b")
    for k, v in ref_export.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    ref_lr = {r["step"]: r["lr"] for r in metric_rows(tmp_path / "ref") if "loss" in r}
    got_lr = {r["step"]: r["lr"] for r in metric_rows(tmp_path / "b") if "loss" in r}
    assert min(got_lr) == saved["step"] + 1
    assert all(got_lr[s] == pytest.approx(ref_lr[s], rel=1e-12) for s in got_lr)
    # the same through the real checkpoint extension (the 2-rank run saved on stop): resume on 1 process
    real = fit_single(str(tmp_path / "a"), [*ov, "data.micro_batch=48", "resume=latest"])
    assert real["resumed_from_step"] == saved["step"]
    _assert_same_state(real["state"], ref["state"], "resumed from the checkpoint")
    got = load_export(tmp_path / "a")
    for k, v in ref_export.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)


def test_load_rejects_state_that_does_not_fit(tmp_path):
    with single_process():
        cfg = load_config(
            None,
            [
                *BASE,
                "data.global_batch=48",
                "data.micro_batch=48",
                "train.epochs=2",
                f"run.out_dir={tmp_path}",
            ],
        )
        trainer = Trainer(cfg, torch.device("cpu"))
        swa = swa_of(trainer)
        swa.setup(trainer)
        swa.update(trainer.opt)
        full = swa.state_dict()
        swa.load_state_dict(full)  # a full state always fits
        name = next(iter(full["averaged"]))
        piece = {
            **full,
            "averaged": {**full["averaged"], name: full["averaged"][name][3:]},
            "offsets": {**full["offsets"], name: 3},
        }
        with pytest.raises(ValueError, match=rf"swa state: {name} holds .* this rank needs \[0, "):
            swa.load_state_dict(piece)
        with pytest.raises(ValueError, match="swa.kind"):
            swa.load_state_dict({**full, "kind": "ema"})


def test_bad_settings_are_config_errors(tmp_path, capsys):
    from dist_opt.train import main

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    common = [str(cfg_file), *BASE, "distributed.nproc=1", f"run.out_dir={tmp_path / 'r'}"]
    assert (
        main([*common, "data.global_batch=48", "data.micro_batch=48", "train.epochs=3", "swa.start_epoch=3"])
        == 2
    )
    err = capsys.readouterr().err
    assert "swa.start_epoch" in err and "3 epoch" in err
    assert (
        main(
            [
                *common,
                "task.name=synthetic",
                "train.steps=5",
                "train.epochs=null",
                "data.global_batch=8",
                "data.micro_batch=8",
            ]
        )
        == 2
    )
    assert "swa.enabled" in capsys.readouterr().err


def test_swa_lr_formula_is_continuous_at_the_end_of_annealing():
    for strategy in ("linear", "cos"):
        assert swalr_lr(0.3, 0.1, 0, 4, strategy) == 0.3
        assert swalr_lr(0.3, 0.1, 4, 4, strategy) == 0.1
        assert swalr_lr(0.3, 0.1, 9, 4, strategy) == 0.1
    assert swalr_lr(0.3, 0.1, 2, 4, "cos") == pytest.approx(
        0.3 + (0.1 - 0.3) * (1 - math.cos(math.pi / 2)) / 2
    )
