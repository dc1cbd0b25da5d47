"""Checkpoints in real runs (gloo ranks, the real Trainer, real files): bitwise exact resume on the
same world size (adamw, lamb, shampoo, SWA with BatchNorm and a plateau schedule), resharding 2->1,
2->3, 1->2 (state equal to the saved one, training continues on the same global batch), async saves,
keep-last-k, the save on an agreed early stop, refusals (other model / optimizer, corrupt or
truncated data, a malicious pickle, a bad path) that leave the existing checkpoints untouched,
torchrun elastic restarts after SIGKILL (mid-save and mid-run) that finish with the parameters of an
uninterrupted run, and extension state (per rank, DTensor-sharded, or refused when it is declared
replicated but differs between ranks)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_opt.checkpoint import CheckpointError, read_model_state, store
from dist_opt.config import ConfigError, load_config
from dist_opt.extensions import Extension
from dist_opt.train import Trainer

BASE = [
    "task.name=synthetic",
    "task.dim=6",
    "task.hidden=10",
    "task.classes=4",
    "task.eval_size=64",
    "data.global_batch=12",
    "train.steps=12",
    "train.progress=false",
    "tracking.wandb.mode=disabled",
    "optimizer.weight_decay=0.01",
    "checkpoint.every_steps=4",
]
OPTS = {
    "adamw": ["optimizer.name=adamw", "optimizer.lr=0.01"],
    "lamb": ["optimizer.name=lamb", "optimizer.lr=0.01"],
    "shampoo": [
        "optimizer.name=shampoo",
        "optimizer.lr=0.01",
        "optimizer.precondition_frequency=3",
        "optimizer.max_preconditioner_dim=4",
    ],
}
# SWA needs epochs (digits: 1437 training samples -> 29 steps of 48 per epoch) and BatchNorm
# exercises the rank-local buffers
# exercises the rank-local buffers; a plateau schedule with a strict threshold, evaluated at the epoch
# ends where the checkpoints are, catches a checkpoint taken before the step's boundary work
SWA = [
    "task.name=digits",
    "task.hidden=16",
    "task.batchnorm=true",
    "train.steps=null",
    "train.epochs=5",
    "data.global_batch=48",
    "data.micro_batch=24",
    "checkpoint.every_steps=0",
    "checkpoint.every_epochs=1",
    "checkpoint.keep=5",
    "swa.enabled=true",
    "swa.start_epoch=3",
    "swa.lr=0.02",
    "swa.anneal_epochs=1",
    "optimizer.name=momentum",
    "optimizer.lr=0.05",
    "train.eval_every=29",
    "schedule.name=plateau",
    "schedule.patience=0",
    "schedule.threshold=0.6",
]


class Probe(Extension):
    """Test-only: the full (gathered) optimizer state and params after setup (i.e. after a resume) and
    after step ``at``."""

    name = "probe"

    def __init__(self, at: int | None = None):
        self.at, self.loaded, self.saved = at, None, None

    @staticmethod
    def _grab(trainer: Trainer) -> dict:
        return {
            "opt": trainer.opt.state_dict(),
            "step": trainer.step,
            "samples": trainer.samples,
            "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        }

    def setup(self, trainer: Trainer) -> None:
        self.loaded = self._grab(trainer)

    def after_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if trainer.step == self.at:
            self.saved = self._grab(trainer)


class Stopper(Extension):
    """Test-only: rank ``world - 1`` asks to stop after step ``at`` (as a preemption signal would)."""

    name = "stopper"

    def __init__(self, at: int):
        self.at = at

    def after_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if trainer.step == self.at and trainer.rank == trainer.world - 1:
            trainer.stop_requested, trainer.stop_reason = True, "test stop"


def fit(
    rank: int,
    world: int,
    out_dir: str,
    overrides: list[str],
    probe_at: int | None = None,
    stop_at: int | None = None,
) -> dict:
    from dist_opt.train import StopRun

    cfg = load_config(None, [*BASE, f"run.out_dir={out_dir}", *overrides])
    trainer = Trainer(cfg, torch.device("cpu"))
    probe = Probe(probe_at)
    trainer.extensions.append(probe)  # after the checkpoint extension: sees the resumed state
    if stop_at is not None:
        trainer.extensions.insert(0, Stopper(stop_at))
    stopped = False
    try:
        trainer.fit()
    except StopRun:
        stopped = True
    rows: dict[int, dict] = {}
    if rank == 0:
        for line in Path(out_dir, "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            if "loss" in row:
                rows[row["step"]] = row
    return {
        "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "losses": {k: r["loss"] for k, r in rows.items()},
        "noise": {k: r["noise/b_simple"] for k, r in rows.items() if "noise/b_simple" in r},
        "loaded": probe.loaded,
        "saved": probe.saved,
        "resumed": trainer.resumed_from_step,
        "run_id": trainer.run_id,
        "step": trainer.step,
        "stopped": stopped,
    }


def in_process(fn, *args):
    """``fn(0, 1, *args)`` in this process as a world of one (its own gloo group)."""
    from dist_opt.dist.env import detect
    from dist_opt.dist.group import destroy_process_group, init_process_group

    init_process_group(detect({}), "gloo", 60)
    try:
        return fn(0, 1, *args)
    finally:
        destroy_process_group()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max abs diff {(a[k] - b[k]).abs().max()})"


def assert_same_opt_state(a: dict, b: dict, what: str) -> None:
    assert a["applied_steps"] == b["applied_steps"] and a["skipped_steps"] == b["skipped_steps"], what
    assert sorted(a["state"]) == sorted(b["state"]), what
    for name in a["state"]:
        assert_same(a["state"][name], b["state"][name], f"{what}: optimizer state of {name}")
    assert [g["lr"] for g in a["param_groups"]] == [g["lr"] for g in b["param_groups"]], what


def step_folder(run: Path, step: int) -> Path:
    return store.step_dir(store.checkpoints_dir(run), step)


# -- exact resume --------------------------------------------------------------------------------
@pytest.mark.timeout(240)
@pytest.mark.parametrize("opt", ["adamw", "lamb", "shampoo", "swa"])
def test_resume_on_the_same_world_size_is_bitwise_exact(tmp_path, world2, opt):
    ov = SWA if opt == "swa" else [*OPTS[opt], "data.micro_batch=3", "distributed.zero_stage=1"]
    full = world2.run(fit, str(tmp_path / "full"), ov)
    steps = [s for s, _ in store.list_step_dirs(store.checkpoints_dir(tmp_path / "full"))]
    # every 4 steps (keep=3) / every epoch of 29 steps (keep=4); the last one at the end
    assert steps == ([29, 58, 87, 116, 145] if opt == "swa" else [4, 8, 12])
    # mid-run checkpoints; SWA: where the plateau schedule matters, and after the first average
    for resume_at in [29, 116] if opt == "swa" else [8]:
        out = tmp_path / f"resumed{resume_at}"
        res = world2.run(fit, str(out), [*ov, f"resume={step_folder(tmp_path / 'full', resume_at)}"])
        assert res[0]["resumed"] == resume_at
        for rank in range(2):
            assert_same(
                res[rank]["params"], full[rank]["params"], f"from {resume_at}: rank {rank} final params"
            )
        later = {s: v for s, v in full[0]["losses"].items() if s > resume_at}
        assert res[0]["losses"] == later  # every loss after the resume point, bit for bit
        # the noise-scale estimate continues its EMA
        assert res[0]["noise"] == {s: v for s, v in full[0]["noise"].items() if s > resume_at}
        assert res[0]["run_id"] == full[0]["run_id"] and res[1]["run_id"] == full[0]["run_id"]  # tracking run
        if opt == "swa":  # the averaged model written at the end is the same too
            a = torch.load(tmp_path / "full" / "swa_model.pt", weights_only=True)
            b = torch.load(out / "swa_model.pt", weights_only=True)
            assert_same(a, b, f"from {resume_at}: swa_model.pt")
    # the final checkpoint read back in one process without a process group (what an export does)
    last = step_folder(tmp_path / "full", steps[-1])
    assert_same(read_model_state(last), full[0]["params"], "read_model_state")
    if opt == "swa":
        swa_model = torch.load(tmp_path / "full" / "swa_model.pt", weights_only=True)
        got = read_model_state(last, swa=True)
        trained = [k for k in full[0]["params"] if "weight" in k or "bias" in k]
        assert_same({k: got[k] for k in trained}, {k: swa_model[k] for k in trained}, "SWA average")


# -- reshard -------------------------------------------------------------------------------------
ADAM = [*OPTS["adamw"], "checkpoint.keep=5"]


@pytest.mark.timeout(240)
def test_reshard_2_to_1_and_3_state_equal_and_training_continues(tmp_path, world2, world3):
    src = world2.run(fit, str(tmp_path / "w2"), [*ADAM, "data.micro_batch=2", "distributed.zero_stage=1"], 8)
    ckpt = step_folder(tmp_path / "w2", 8)
    saved = src[0]["saved"]  # full optimizer state (gathered) and params after step 8
    assert_same_opt_state(src[1]["saved"]["opt"], saved["opt"], "ranks agree")
    one = in_process(fit, str(tmp_path / "w1"), [*ADAM, "data.micro_batch=12", f"resume={ckpt}"])
    three = world3.run(
        fit, str(tmp_path / "w3"), [*ADAM, "data.micro_batch=2", "distributed.zero_stage=2", f"resume={ckpt}"]
    )
    for label, res in [("2->1", one), *((f"2->3 rank {r}", three[r]) for r in range(3))]:
        loaded = res["loaded"]
        assert loaded["step"] == 8 and loaded["samples"] == 8 * 12, label
        assert_same(loaded["params"], saved["params"], f"{label}: params after load")
        assert_same_opt_state(loaded["opt"], saved["opt"], f"{label}: optimizer state after load")
        for k, v in src[0]["params"].items():  # same global batches: the uninterrupted run, to round-off
            torch.testing.assert_close(res["params"][k], v, rtol=1e-5, atol=1e-6, msg=f"{label}: {k}")


@pytest.mark.timeout(240)
def test_reshard_1_to_2_from_replicated_state(tmp_path, world2):
    src = in_process(fit, str(tmp_path / "w1"), [*ADAM, "data.micro_batch=12"], 8)
    res = world2.run(
        fit,
        str(tmp_path / "w2"),
        [
            *ADAM,
            "data.micro_batch=3",
            "distributed.zero_stage=2",
            f"resume={step_folder(tmp_path / 'w1', 8)}",
        ],
    )
    for rank in range(2):
        assert_same(res[rank]["loaded"]["params"], src["saved"]["params"], f"rank {rank}: params after load")
        assert_same_opt_state(
            res[rank]["loaded"]["opt"], src["saved"]["opt"], f"rank {rank}: state after load"
        )
        for k, v in src["params"].items():
            torch.testing.assert_close(
                res[rank]["params"][k], v, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {k}"
            )


# -- async, keep ---------------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_async_save_equals_sync_and_keeps_last_k(tmp_path, world2):
    ov = [*OPTS["adamw"], "data.micro_batch=6", "distributed.zero_stage=2", "checkpoint.every_steps=2"]
    sync = world2.run(fit, str(tmp_path / "sync"), [*ov, "checkpoint.keep=2"])
    asyn = world2.run(fit, str(tmp_path / "async"), [*ov, "checkpoint.keep=2", "checkpoint.async=true"])
    for run in ("sync", "async"):
        assert [s for s, _ in store.list_step_dirs(store.checkpoints_dir(tmp_path / run))] == [10, 12]
        assert all(store.check(p).ok for _, p in store.list_step_dirs(store.checkpoints_dir(tmp_path / run)))
    for rank in range(2):
        assert_same(
            asyn[rank]["params"], sync[rank]["params"], "saving in the background does not perturb training"
        )
    # the async checkpoint holds the same state as the sync one: resuming from either gives the same run
    a = world2.run(fit, str(tmp_path / "ra"), [*ov, f"resume={step_folder(tmp_path / 'async', 10)}"])
    s = world2.run(fit, str(tmp_path / "rs"), [*ov, f"resume={step_folder(tmp_path / 'sync', 10)}"])
    for rank in range(2):
        assert_same(
            a[rank]["loaded"]["opt"]["state"]["fc1.weight"],
            s[rank]["loaded"]["opt"]["state"]["fc1.weight"],
            "async vs sync checkpoint",
        )
        assert_same(a[rank]["params"], sync[rank]["params"], "resumed from the async checkpoint")


@pytest.mark.timeout(120)
def test_agreed_stop_saves_where_it_stopped_and_resumes_exactly(tmp_path, world2):
    """A stop request (what a preemption signal sets) on one rank: both ranks stop after the same step,
    the checkpoint extension saves that step, and resume=latest continues as if never stopped."""
    ov = [*OPTS["adamw"], "data.micro_batch=6", "distributed.zero_stage=2", "checkpoint.every_steps=0"]
    ref = world2.run(fit, str(tmp_path / "ref"), ov)
    out = tmp_path / "run"
    stopped = world2.run(fit, str(out), ov, None, 7)  # asked after step 7, agreed in step 8's all-reduce
    assert [r["stopped"] for r in stopped] == [True, True] and [r["step"] for r in stopped] == [8, 8]
    assert [s for s, _ in store.list_step_dirs(store.checkpoints_dir(out))] == [8]
    manifest = json.loads((step_folder(out, 8) / store.MANIFEST).read_text())
    assert manifest["reason"] == "stop" and manifest["step"] == 8
    res = world2.run(fit, str(out), [*ov, "resume=latest"])
    assert res[0]["resumed"] == 8
    for rank in range(2):
        assert_same(res[rank]["params"], ref[rank]["params"], f"rank {rank}: stopped at 8, resumed")
    assert res[0]["losses"] == ref[0]["losses"]  # metrics.jsonl: steps 1-8 kept, 9-12 appended


# -- refusals ------------------------------------------------------------------------------------
def digests(run: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run)): store.crc32_file(p)
        for p in sorted(run.rglob("*"))
        if p.is_file() and "checkpoints" in p.parts
    }


def _expect_refusal(out_dir: Path, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        in_process(fit, str(out_dir), overrides)
    return str(e.value)


@pytest.mark.timeout(180)
def test_refusals_leave_checkpoints_untouched(tmp_path):
    run = tmp_path / "run"
    in_process(fit, str(run), [*OPTS["adamw"], "data.micro_batch=12", "train.steps=8"])
    before = digests(run)
    assert len(before) == 8  # step-4 and step-8: data, .metadata, manifest, marker

    # another model: every mismatched key and shape is named
    msg = _expect_refusal(run, [*OPTS["adamw"], "data.micro_batch=12", "task.hidden=12", "resume=latest"])
    assert "does not fit this run" in msg
    assert "parameter fc1.weight: checkpoint has shape [10, 6] float32, this run has [12, 6] float32" in msg
    assert "parameter out.weight: checkpoint has shape [4, 10]" in msg
    assert "optimizer state fc1.weight.exp_avg: checkpoint has shape [60]" in msg
    # another optimizer
    msg = _expect_refusal(run, [*OPTS["lamb"], "data.micro_batch=12", "resume=latest"])
    assert "optimizer.name: checkpoint has 'adamw', config has 'lamb'" in msg
    msg = _expect_refusal(
        run, [*OPTS["adamw"], "optimizer.amsgrad=true", "data.micro_batch=12", "resume=latest"]
    )
    assert "optimizer.amsgrad" in msg and "max_exp_avg_sq: missing from the checkpoint" in msg
    # a fresh run into the same folder would overwrite the checkpoints
    msg = _expect_refusal(run, [*OPTS["adamw"], "data.micro_batch=12"])
    assert "already holds checkpoints" in msg and "resume=latest" in msg
    assert digests(run) == before

    # corrupt (one flipped byte) / truncated data: a clear error naming the file; latest falls back
    ck = step_folder(run, 8)
    data = ck / "__0_0.distcp"
    raw = data.read_bytes()
    data.write_bytes(raw[:200] + bytes([raw[200] ^ 1]) + raw[201:])
    msg = _expect_refusal(tmp_path / "other", [*OPTS["adamw"], "data.micro_batch=12", f"resume={ck}"])
    assert "cannot resume: file __0_0.distcp is corrupt (its CRC-32 differs from the manifest)" in msg
    data.write_bytes(raw[:-100])
    msg = _expect_refusal(tmp_path / "other", [*OPTS["adamw"], "data.micro_batch=12", f"resume={ck}"])
    assert "__0_0.distcp has" in msg and "truncated" in msg
    res = in_process(
        fit,
        str(tmp_path / "fallback"),
        [*OPTS["adamw"], "data.micro_batch=12", "train.steps=8", f"resume={run}"],
    )
    assert res["resumed"] == 4  # step-8 skipped, step-4 used


@pytest.mark.timeout(180)
def test_malicious_pickle_in_a_checkpoint_is_refused(tmp_path):
    """A .metadata crafted to run code, with manifest and marker rewritten to match it (as an attacker
    would): the resume is refused before anything is unpickled beyond the allow-list."""
    run = tmp_path / "run"
    in_process(fit, str(run), [*OPTS["adamw"], "data.micro_batch=12", "train.steps=4"])
    ck = step_folder(run, 4)
    pwned = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {pwned}",))

    (ck / ".metadata").write_bytes(pickle.dumps(Evil()))
    manifest = json.loads((ck / store.MANIFEST).read_text())
    manifest["files"][".metadata"] = store.digest(ck / ".metadata")
    (ck / store.MARKER).unlink()
    store.finalize(ck, manifest)
    assert store.check(ck).ok  # integrity checks alone cannot catch it
    msg = _expect_refusal(tmp_path / "victim", [*OPTS["adamw"], "data.micro_batch=12", f"resume={ck}"])
    assert "refused global posix.system" in msg and not pwned.exists()


def test_bad_resume_path_exits_2_with_one_line(tmp_path, capfd):
    from dist_opt.train import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    code = main(
        [
            str(cfg),
            *BASE,
            "distributed.nproc=1",
            "data.micro_batch=12",
            f"run.out_dir={tmp_path / 'r'}",
            f"resume={tmp_path / 'missing'}",
        ]
    )
    err = capfd.readouterr().err
    assert code == 2
    assert f"resume: '{tmp_path / 'missing'}' does not exist" in err
    assert not (tmp_path / "r" / "checkpoints").exists()


# -- elastic restart under torchrun ----------------------------------------------------------------
@pytest.mark.timeout(300)
def test_torchrun_restarts_after_sigkill_mid_save_and_mid_run(tmp_path, world2):
    """Attempt 0: rank 1 is SIGKILLed while saving step 8 (its data written, no marker yet). Attempt 1
    (resume=latest) skips that partial folder, resumes from step 4 and rank 1 is SIGKILLed right after
    step 10. Attempt 2 resumes from step 8 and finishes: the final parameters and the whole loss curve
    equal an uninterrupted run's."""
    ov = [*OPTS["adamw"], "data.micro_batch=3", "distributed.zero_stage=1"]
    ref = world2.run(fit, str(tmp_path / "ref"), ov)
    out = tmp_path / "elastic"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DIST_OPT_TEST_KILL_IN_SAVE": "1:8:0",
        "DIST_OPT_TEST_KILL_AT_STEP": "1:10:1",
        "LOGLEVEL": "WARNING",
    }
    # (torchrun keeps one store across restart rounds; dist_opt/dist/group.py prefixes it per attempt)
    # a short distributed.timeout_s: the surviving rank notices its dead peer within seconds
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "--max-restarts=2",
        "--module",
        "dist_opt.train",
        str(cfg),
        *BASE,
        *ov,
        f"run.out_dir={out}",
        "resume=latest",
        "distributed.timeout_s=10",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    err = proc.stderr
    assert "during the save of step 8: SIGKILL" in err and "after step 10: SIGKILL" in err
    assert "step-8 skipped: incomplete (no COMPLETE marker" in err
    assert "resumed from" in err and "(step 4," in err and "(step 8," in err
    got = torch.load(out / "final_params.pt", weights_only=True)
    assert_same(got, ref[0]["params"], "final params after two kills and restarts")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert losses == ref[0]["losses"]
    assert [s for s, _ in store.list_step_dirs(store.checkpoints_dir(out))] == [4, 8, 12]
    assert all(store.check(p).ok for _, p in store.list_step_dirs(store.checkpoints_dir(out)))


# -- extension state ------------------------------------------------------------------------------
class RankState(Extension):
    """Test-only extension with rank-dependent state: a plain tensor and a DTensor piece of a
    flattened tensor of 5 elements (values 100*step + index)."""

    name = "rankstate"

    def __init__(self, per_rank: bool):
        self.checkpoint_per_rank = per_rank
        self.loaded: dict | None = None

    def setup(self, trainer: Trainer) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import DeviceMesh

        self.trainer = trainer
        self.mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu")

    def state_dict(self) -> dict:
        from dist_opt.checkpoint import shard_piece

        t = self.trainer
        c = -(-5 // t.world)
        lo, hi = min(t.rank * c, 5), min((t.rank + 1) * c, 5)
        full = torch.arange(5.0) + 100 * t.step
        return {
            "mine": torch.full((2,), float(t.rank)),
            "step": t.step,
            "piece": shard_piece(full[lo:hi], 5, self.mesh),
        }

    def load_state_dict(self, state: dict) -> None:
        self.loaded = {
            "mine": state["mine"].clone(),
            "step": state["step"],
            "piece": state["piece"].to_local().clone(),
        }


def fit_rankstate(rank: int, world: int, out_dir: str, overrides: list[str], per_rank: bool) -> dict:
    cfg = load_config(None, [*BASE, f"run.out_dir={out_dir}", *overrides])
    trainer = Trainer(cfg, torch.device("cpu"))
    ext = RankState(per_rank)
    trainer.extensions.insert(len(trainer.extensions) - 1, ext)  # before the checkpoint extension
    trainer.fit()
    return {"loaded": ext.loaded}


@pytest.mark.timeout(180)
def test_extension_state_per_rank_sharded_or_refused(tmp_path, world2, world3):
    ov = [*OPTS["adamw"], "data.micro_batch=2", "train.steps=4", "checkpoint.every_steps=2"]
    world2.run(fit_rankstate, str(tmp_path / "ok"), ov, True)
    resume = [f"resume={step_folder(tmp_path / 'ok', 2)}"]
    same = world2.run(fit_rankstate, str(tmp_path / "r2"), [*ov, *resume], True)
    more = world3.run(fit_rankstate, str(tmp_path / "r3"), [*ov, *resume, "data.micro_batch=4"], True)
    for rank, res in enumerate(same + more):
        got, world = res["loaded"], 2 if rank < 2 else 3
        r = rank if rank < 2 else rank - 2
        src = r if r < 2 else 0  # ranks beyond the saved world size take rank 0's per-rank state
        assert torch.equal(got["mine"], torch.full((2,), float(src))) and got["step"] == 2
        c = -(-5 // world)  # the DTensor piece is resharded to this rank's range
        assert torch.equal(got["piece"], (torch.arange(5.0) + 200)[min(r * c, 5) : min((r + 1) * c, 5)])
    # rank-dependent values declared replicated would be silently deduplicated by DCP: refused at save
    # (last: the failed call restarts the harness)
    with pytest.raises(RuntimeError, match="extension state differs between ranks: shared/ext/rankstate/m"):
        world2.run(fit_rankstate, str(tmp_path / "bad"), ov, False)
    assert not store.check(step_folder(tmp_path / "bad", 2)).ok  # no marker: not a checkpoint


@pytest.fixture(autouse=True)
def _no_leftover_runs(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_checkpoint_error_is_a_config_error():
    assert issubclass(CheckpointError, ConfigError) and CheckpointError(["x"]).exit_code == 2
