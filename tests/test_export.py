"""``dist-opt export``: a checkpoint (native with SWA, fsdp2) as a plain state_dict file, and its refusals."""

from __future__ import annotations

import os

import pytest
import torch

from dist_opt.checkpoint import store
from dist_opt.config import load_config
from dist_opt.export_cli import main as export_main
from dist_opt.integrations import full_state_dict

DIGITS_SWA = [
    "task.name=digits",
    "task.hidden=8",
    "train.steps=null",
    "train.epochs=2",
    "train.progress=false",
    "train.eval_max_samples=64",
    "data.global_batch=96",
    "data.micro_batch=48",
    "tracking.wandb.mode=disabled",
    "optimizer.name=adamw",
    "optimizer.lr=0.01",
    "swa.enabled=true",
    "swa.start_epoch=0",
    "swa.update_bn=false",
]
SYNTH_FSDP2 = [
    "task.name=synthetic",
    "task.dim=5",
    "task.hidden=9",
    "task.classes=3",
    "task.eval_size=32",
    "data.global_batch=12",
    "data.micro_batch=3",
    "train.steps=4",
    "train.progress=false",
    "train.eval_max_samples=32",
    "tracking.wandb.mode=disabled",
    "optimizer.name=adamw",
    "optimizer.lr=0.01",
    "distributed.engine=fsdp2",
    "checkpoint.every_steps=2",
]


def fit(rank: int, world: int, out_dir: str, overrides: list[str]) -> dict:
    from dist_opt.train import Trainer

    cfg = load_config(None, [*overrides, f"run.out_dir={out_dir}"])
    trainer = Trainer(cfg, torch.device("cpu"))
    trainer.fit()
    return {"params": full_state_dict(trainer.model)}


def fresh_model(overrides: list[str]) -> torch.nn.Module:
    from dist_opt.tasks import build_task

    cfg = load_config(None, overrides)
    return build_task(cfg.task, cfg.run.seed).build_model()


def load_into_fresh(path, overrides: list[str]) -> dict[str, torch.Tensor]:
    sd = torch.load(path, weights_only=True)
    model = fresh_model(overrides)
    model.load_state_dict(sd)  # strict: every key, every shape
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_equal(got: dict, want: dict, keys=None) -> None:
    for k in keys if keys is not None else want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.timeout(300)
def test_export_native_swa_and_fsdp2_checkpoints(tmp_path, world2, capsys):
    run = tmp_path / "native"
    final = world2.run(fit, str(run), DIGITS_SWA)[0]["params"]
    out = tmp_path / "model.pt"
    assert export_main([str(run), "--out", str(out)]) == 0
    assert_equal(load_into_fresh(out, DIGITS_SWA), final)
    swa_out = tmp_path / "swa.pt"
    assert export_main([str(run), "--out", str(swa_out), "--swa"]) == 0
    want = torch.load(run / "swa_model.pt", weights_only=True)  # what the SWA extension wrote at the end
    trained = [k for k in final if k.endswith(("weight", "bias"))]
    assert_equal(load_into_fresh(swa_out, DIGITS_SWA), want, trained)
    assert any(not torch.equal(want[k], final[k]) for k in trained), (
        "the average differs from the live weights"
    )

    fsdp = tmp_path / "fsdp2"
    final = world2.run(fit, str(fsdp), SYNTH_FSDP2)[0]["params"]
    assert export_main([str(fsdp), "--out", str(out), "--force"]) == 0
    assert_equal(load_into_fresh(out, SYNTH_FSDP2), final)
    assert export_main([str(fsdp), "--out", str(out), "--force", "--step", "2"]) == 0
    assert not any(torch.equal(v, final[k]) for k, v in torch.load(out, weights_only=True).items())
    capsys.readouterr()

    # refusals: one line on stderr, exit 2, nothing written
    before = out.read_bytes()
    cases = [
        ([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pt")], "no such run directory"),
        ([str(tmp_path), "--out", str(tmp_path / "x.pt")], "no checkpoint"),
        ([str(fsdp), "--out", str(tmp_path / "x.pt"), "--step", "3"], "no checkpoint of step 3"),
        ([str(fsdp), "--out", str(tmp_path)], "is a directory"),
        ([str(fsdp), "--out", str(out)], "exists; pass --force"),
        ([str(fsdp), "--out", str(tmp_path / "x.pt"), "--swa"], "no SWA average"),
        ([str(fsdp), "--out", str(tmp_path / "missing" / "x.pt")], "does not exist"),
    ]
    for args, why in cases:
        assert export_main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("dist-opt export: ") and why in err, err
    assert out.read_bytes() == before and not (tmp_path / "x.pt").exists()
    # a checkpoint without its completion marker is not exported
    (store.checkpoints_dir(fsdp) / "step-4" / store.MARKER).unlink()
    (store.checkpoints_dir(fsdp) / "step-2" / store.MARKER).unlink()
    assert export_main([str(fsdp), "--out", str(tmp_path / "x.pt")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
