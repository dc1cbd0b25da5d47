"""Mixed precision: fp32 master shards of bf16 parameters, bf16 compute, fp16 loss scaling.

References are single-process loops that perform the same casts as the engine: fp32 master
weights, a bf16 working copy rounded from them, bf16 autocast forward/backward of the same
micro-batches, gradients upcast to fp32 and averaged in fp32, the update on the fp32 masters.
Because every bf16 rounding happens on identical values on both sides, the only differences left
are fp32 ones (the order of the gradient sum over ranks / micro-steps, the rule's fp32 arithmetic):
the tolerance is the fp32 one of the exactness tests (tests/test_engine_exact.py), not a bf16 one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference_optim import RefLAMB, RefLARS
from test_checkpoint import ADAM, assert_same, assert_same_opt_state, fit, in_process, step_folder
from test_engine_exact import GLOBAL_BATCH, LR, WD, batch, make_model, micro_steps, sharded_opt
from torch import nn

from dist_opt.config import ConfigError, load_config
from dist_opt.engine.loss_scale import INITIAL_SCALE, LossScaler
from dist_opt.engine.sharded import ShardedOptimizer
from dist_opt.integrations import check_engine

STEPS = 20
BF16 = torch.bfloat16
NAMES = ["adamw", "lamb", "lars"]
ACCUM = {1: 2, 2: 2, 3: 1}  # micro batch = 12 / (world * accumulation): 6, 3, 4


def autocast():
    return torch.autocast("cpu", dtype=BF16)


def bf16_model() -> nn.Module:
    return make_model().to(BF16)


def full_masters(opt: ShardedOptimizer, model: nn.Module) -> list[torch.Tensor]:
    """The fp32 masters of every parameter (gathered: a collective), in registration order."""
    state = opt.state_dict()["state"]
    return [state[n]["master"].view(p.shape).clone() for n, p in model.named_parameters()]


def train_bf16(
    rank: int, world: int, name: str, stage: int, accum: int, steps: int = STEPS, bf16: bool = True
) -> dict:
    """``bf16`` False: the same loop in fp32 (no autocast, no masters)."""
    model = bf16_model() if bf16 else make_model()
    opt = sharded_opt(model, name, stage)
    losses, ratios = [], []
    for step in range(steps):
        losses += micro_steps(model, opt, step, rank, world, accum, autocast if bf16 else None)
        assert opt.step() is True
        opt.zero_grad()
        if step == 0 and bf16:
            first = full_masters(opt, model)
        if "trust_ratios" in opt.last_stats:
            ratios.append(opt.last_stats["trust_ratios"].clone().flip(0))  # registration order
    return {
        "masters": full_masters(opt, model) if bf16 else None,
        "first": first if bf16 else None,
        "params": [p.detach().clone() for p in model.parameters()],
        "dtypes": [p.dtype for p in model.parameters()],
        "state_dtypes": {k: v.dtype for e in opt.sharded_state().values() for k, v in e.items()},
        "losses": losses,
        "ratios": ratios,
    }


def reference_bf16(name: str, world: int, accum: int, steps: int = STEPS) -> dict:
    """One process: fp32 masters, bf16 working copy, the ranks' micro-batches one after another."""
    master_model = make_model().to(BF16).float()  # the engine's masters start from the bf16 model
    masters = list(master_model.parameters())
    work = copy.deepcopy(master_model).to(BF16)
    wparams = list(work.parameters())
    decay = [p for p in masters if p.ndim > 1]
    groups = [
        {"params": decay, "weight_decay": WD},
        {"params": [p for p in masters if p.ndim <= 1], "weight_decay": 0.0},
    ]
    excluded = [i for i, p in enumerate(masters) if p.ndim <= 1]
    opt = {
        "adamw": lambda: torch.optim.AdamW(groups, lr=LR[name]),
        "lamb": lambda: RefLAMB(masters, lr=LR[name], weight_decay=WD, excluded=excluded),
        "lars": lambda: RefLARS(masters, lr=LR[name], weight_decay=WD, excluded=excluded),
    }[name]()
    micro = GLOBAL_BATCH // (world * accum)
    ratios = []
    for step in range(steps):
        with torch.no_grad():
            for w, m in zip(wparams, masters, strict=True):
                w.copy_(m)  # round to bf16
        x, y = batch(step)
        per_rank = []
        for rank in range(world):
            acc = [torch.zeros_like(m) for m in masters]
            for k in range(accum):
                lo = (k * world + rank) * micro
                with autocast():
                    loss = nn.functional.mse_loss(work(x[lo : lo + micro]), y[lo : lo + micro])
                for a, g in zip(acc, torch.autograd.grad(loss, wparams), strict=True):
                    a += g.float()
            per_rank.append(acc)
        for i, m in enumerate(masters):
            m.grad = sum(r[i] for r in per_rank) / (world * accum)
        opt.step()
        if step == 0:
            first = [m.detach().clone() for m in masters]
        if hasattr(opt, "ratios"):
            ratios.append(torch.tensor(opt.ratios, dtype=torch.float64))
    return {
        "first": first,
        "masters": [m.detach().clone() for m in masters],
        "params": [w.detach().clone() for w in wparams],
        "ratios": ratios,
    }


# -- (a) the stall ------------------------------------------------------------------------------
def stall(rank: int, world: int, stage: int) -> tuple[float, float, torch.dtype]:
    w = nn.Parameter(torch.ones(5, dtype=BF16))
    opt = ShardedOptimizer([("w", w)], "sgd", lr=1e-3, zero_stage=stage)
    for _ in range(100):
        w.float().sum().backward()  # gradient 1 for every element
        opt.step()
        opt.zero_grad()
    master = opt.state_dict()["state"]["w"]["master"]
    return float(master[0]), float(w[0]), master.dtype


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_bf16_sgd_small_updates_accumulate_in_the_fp32_master(world2, stage):
    for master, work, dtype in world2.run(stall, stage):
        assert dtype == torch.float32
        assert master == pytest.approx(0.9, abs=1e-4)  # without masters, 1.0 - 1e-3 rounds back to 1.0
        assert work == float(torch.tensor(master).to(BF16))  # the working copy is the rounded master
        assert work != 1.0


# -- (b) 1 vs 2 vs 3 ranks, ZeRO 0/1/2 ----------------------------------------------------------
def run_all(rank: int, world: int) -> dict:
    return {(n, s): train_bf16(rank, world, n, s, ACCUM[world]) for n in NAMES for s in (0, 1, 2)}


_cache: dict = {}


@pytest.fixture(scope="module")
def results(world2, world3):
    if not _cache:
        _cache[1] = [run_all(0, 1)]
        _cache[2] = world2.run(run_all)
        _cache[3] = world3.run(run_all)
        _cache["ref"] = {(n, w): reference_bf16(n, w, ACCUM[w]) for n in NAMES for w in (1, 2, 3)}
    return _cache


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_bf16_masters_equal_single_process_reference_and_ranks_agree(results, name, world):
    ref = results["ref"][(name, world)]
    for stage in (0, 1, 2):
        per_rank = results[world]
        for rank, res in enumerate(per_rank):
            r = res[(name, stage)]
            assert all(d == BF16 for d in r["dtypes"])
            assert set(r["state_dtypes"].values()) == {torch.float32}  # moments and masters: fp32
            for i, (a, b) in enumerate(zip(r["masters"], ref["masters"], strict=True)):
                torch.testing.assert_close(
                    a,
                    b,
                    rtol=2e-5,
                    atol=2e-6,
                    msg=lambda m, i=i, s=stage, r=rank: f"{s=} {r=} master {i}: {m}",
                )
            for a, m in zip(r["params"], r["masters"], strict=True):
                assert torch.equal(a, m.to(BF16))  # the working copy is the rounded master
        for res in per_rank[1:]:  # bit-identical ranks
            for a, b in zip(
                res[(name, stage)]["masters"], per_rank[0][(name, stage)]["masters"], strict=True
            ):
                assert torch.equal(a, b)
            for a, b in zip(res[(name, stage)]["params"], per_rank[0][(name, stage)]["params"], strict=True):
                assert torch.equal(a, b)


def test_bf16_loss_trajectory_stays_close_to_fp32(results):
    """bf16 rounds activations to 8 mantissa bits (relative error <= 2**-9 per op); over 20 AdamW steps
    the per-micro-step loss stays within 1% (relative; measured: 0.4%) of the fp32 run of the same data
    and rule."""
    bf16 = results[1][0][("adamw", 2)]["losses"]
    fp32 = train_bf16(0, 1, "adamw", 2, ACCUM[1], bf16=False)["losses"]
    assert fp32[-1] < 0.8 * fp32[0]  # it trains
    for a, b in zip(bf16, fp32, strict=True):
        assert a == pytest.approx(b, rel=1e-2)


# -- (c) trust ratios from the masters ----------------------------------------------------------
def test_lamb_trust_ratios_come_from_the_fp32_masters(results):
    for world in (1, 2, 3):
        ref = results["ref"][("lamb", world)]["ratios"]
        for stage in (0, 1, 2):
            got = results[world][0][("lamb", stage)]["ratios"]
            assert len(got) == len(ref) == STEPS
            for t, (a, b) in enumerate(zip(got, ref, strict=True)):
                torch.testing.assert_close(
                    a, b, rtol=2e-5, atol=0, msg=lambda m, t=t, w=world, s=stage: f"{w=} {s=} step {t}: {m}"
                )


# -- (d) fp16 dynamic loss scaling --------------------------------------------------------------
def test_loss_scaler_rule():
    s = LossScaler(growth_interval=2)
    assert s.scale == INITIAL_SCALE == 2.0**16
    s.update(False)
    assert s.scale == 2.0**15 and s.overflows == 1
    s.update(True)
    assert s.scale == 2.0**15
    s.update(True)
    assert s.scale == 2.0**16  # growth after growth_interval clean steps
    s.update(True)
    s.update(False)
    s.update(True)
    assert s.scale == 2.0**15  # an overflow restarts the count
    fresh = LossScaler(growth_interval=2)
    fresh.load_state_dict(s.state_dict())
    assert fresh.state_dict() == s.state_dict()
    static = LossScaler(128.0)
    static.update(False)
    static.update(True)
    assert static.scale == 128.0
    with pytest.raises(ValueError):
        LossScaler(0.0)


def fp16_run(rank: int, world: int, stage: int) -> dict:
    def build() -> tuple[nn.Module, ShardedOptimizer]:
        model = make_model()
        scaler = LossScaler(init_scale=2.0**10, growth_interval=3)
        return model, ShardedOptimizer(
            model.named_parameters(), "adamw", lr=0.01, zero_stage=stage, loss_scale=scaler
        )

    model, opt = build()
    steps = []
    for step in range(6):
        x, y = batch(step)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(model(x[rank * 6 : rank * 6 + 6]), y[rank * 6 : rank * 6 + 6])
        if step == 1 and rank == 1:
            loss = loss * float("inf")  # an overflow on one rank only
        before = [p.detach().clone() for p in model.parameters()]
        (loss * opt.loss_scale).backward()
        applied = opt.step()
        opt.zero_grad()
        unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        steps.append((applied, opt.loss_scale, unchanged))
    sd = opt.state_dict()
    _, fresh = build()
    fresh.load_state_dict(sd)
    return {"steps": steps, "restored": fresh.loss_scale, "state": sd["loss_scale"]}


@pytest.mark.parametrize("stage", [0, 2])
def test_fp16_overflow_on_one_rank_skips_everywhere_halves_then_grows(world2, stage):
    k = 2.0**10
    expected = [(True, k), (False, k / 2), (True, k / 2), (True, k / 2), (True, k), (True, k)]
    for res in world2.run(fp16_run, stage):
        assert [(a, s) for a, s, _ in res["steps"]] == expected
        assert [u for _, _, u in res["steps"]] == [False, True, False, False, False, False]  # skip: no update
        assert res["restored"] == k and res["state"]["clean_steps"] == 1 and res["state"]["overflows"] == 1


def test_grad_scaler_is_refused_with_a_pointer_to_precision_loss_scale():
    def go(rank: int, world: int) -> None:
        model = make_model()
        opt = ShardedOptimizer(model.named_parameters(), "adamw", lr=0.01, zero_stage=0)
        scaler = torch.amp.GradScaler("cpu")
        x, y = batch(0)
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        with pytest.raises(TypeError, match="precision.loss_scale"):
            scaler.step(opt)

    in_process(go)


FP16 = [*ADAM, "precision.compute=fp16", "precision.growth_interval=3", "checkpoint.keep=5"]


@pytest.mark.timeout(240)
def test_fp16_trainer_resume_restores_the_loss_scale(tmp_path, world2):
    full = world2.run(fit, str(tmp_path / "full"), [*FP16, "data.micro_batch=3"], 8)
    saved = full[0]["saved"]["opt"]["loss_scale"]
    assert saved != LossScaler(growth_interval=3).state_dict()  # it moved (growth / overflows)
    res = world2.run(
        fit,
        str(tmp_path / "res"),
        [*FP16, "data.micro_batch=3", f"resume={step_folder(tmp_path / 'full', 8)}"],
    )
    for r in res:
        assert r["loaded"]["opt"]["loss_scale"] == saved
    assert res[0]["losses"] == {s: v for s, v in full[0]["losses"].items() if s > 8}
    assert_same(res[0]["params"], full[0]["params"], "fp16 resumed final params")


# -- (e) checkpoints hold the fp32 masters ------------------------------------------------------
BF16_RUN = [*ADAM, "precision.compute=bf16", "precision.params=bf16"]


def saved_dtypes(folder) -> dict[str, torch.dtype]:
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {k: v.properties.dtype for k, v in meta.items() if hasattr(v, "properties")}


@pytest.mark.timeout(400)
def test_bf16_checkpoint_holds_fp32_masters_resumes_exactly_and_reshards(tmp_path, world2, world3):
    src = world2.run(
        fit, str(tmp_path / "w2"), [*BF16_RUN, "data.micro_batch=3", "distributed.zero_stage=1"], 8
    )
    ckpt = step_folder(tmp_path / "w2", 8)
    dtypes = saved_dtypes(ckpt)
    for name in ("fc1.weight", "out.bias"):
        assert dtypes[f"model/{name}"] == BF16
        assert dtypes[f"optim/{name}/master"] == torch.float32
        assert dtypes[f"optim/{name}/exp_avg"] == torch.float32
    saved = src[0]["saved"]
    assert saved["opt"]["state"]["fc1.weight"]["master"].dtype == torch.float32
    # exact resume on the same world size
    res = world2.run(
        fit,
        str(tmp_path / "again"),
        [*BF16_RUN, "data.micro_batch=3", "distributed.zero_stage=1", f"resume={ckpt}"],
    )
    for r in range(2):
        assert_same(res[r]["params"], src[r]["params"], f"rank {r} final params")
    assert res[0]["losses"] == {s: v for s, v in src[0]["losses"].items() if s > 8}
    # reshard 2 -> 1 and 2 -> 3: masters and moments as saved
    one = in_process(fit, str(tmp_path / "w1"), [*BF16_RUN, "data.micro_batch=12", f"resume={ckpt}"])
    three = world3.run(
        fit,
        str(tmp_path / "w3"),
        [*BF16_RUN, "data.micro_batch=2", "distributed.zero_stage=2", f"resume={ckpt}"],
    )
    for label, r in [("2->1", one), *((f"2->3 rank {i}", three[i]) for i in range(3))]:
        assert r["loaded"]["step"] == 8, label
        assert_same(r["loaded"]["params"], saved["params"], f"{label}: params after load")
        assert_same_opt_state(r["loaded"]["opt"], saved["opt"], f"{label}: masters and state after load")


# -- (f) mixed dtypes ---------------------------------------------------------------------------
def mixed_run(rank: int, world: int, stage: int) -> dict:
    model = make_model()
    model.fc1.to(BF16)  # fc1 bf16, LayerNorm and fc2 fp32
    opt = ShardedOptimizer(model.named_parameters(), "lamb", lr=0.01, weight_decay=WD, zero_stage=stage)
    accum = 2 // world  # micro-batches of 6 on 1 and 2 ranks: the same bf16 gradients
    for step in range(10):
        x, y = batch(step)
        for k in range(accum):
            lo = (k * world + rank) * 6
            with autocast():
                loss = nn.functional.mse_loss(model(x[lo : lo + 6]), y[lo : lo + 6])
            loss.backward()
        assert opt.step() is True
        opt.zero_grad()
    state = opt.state_dict()["state"]
    return {
        "dtypes": {n: p.dtype for n, p in model.named_parameters()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "with_master": sorted(n for n, e in state.items() if "master" in e),
        "state_dtypes": {e[k].dtype for e in state.values() for k in e},
    }


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_mixed_dtype_model_is_accepted_and_matches_one_process(world2, stage):
    one = mixed_run(0, 1, stage)
    two = world2.run(mixed_run, stage)
    for res in [one, *two]:
        assert res["dtypes"] == {
            "fc1.weight": BF16,
            "fc1.bias": BF16,
            "ln.weight": torch.float32,
            "ln.bias": torch.float32,
            "fc2.weight": torch.float32,
            "fc2.bias": torch.float32,
        }
        assert res["with_master"] == ["fc1.bias", "fc1.weight"]  # fp32 layers are their own masters
        assert res["state_dtypes"] == {torch.float32}
    assert_same(two[1]["params"], two[0]["params"], "ranks")
    for n, v in one["params"].items():  # the gradient sum over ranks is the only difference (fp32)
        torch.testing.assert_close(two[0]["params"][n].float(), v.float(), rtol=2e-5, atol=2e-6)


# -- config and other engines -------------------------------------------------------------------
def test_precision_config_checks_and_non_native_refusals():
    with pytest.raises(ConfigError, match="precision.compute: bf16"):
        load_config(None, ["precision.params=bf16"])
    cfg = load_config(None, ["precision.params=bf16", "precision.compute=bf16", "distributed.engine=fsdp2"])
    assert any(p.startswith("precision.params") for p in check_engine(cfg, 2))
    cfg = load_config(None, ["precision.compute=fp16", "distributed.engine=deepspeed"])
    assert any(p.startswith("precision.compute") for p in check_engine(cfg, 2))
    cfg = load_config(
        None, ["precision.compute=bf16", "distributed.engine=deepspeed", "checkpoint.at_end=false"]
    )
    assert not any(p.startswith("precision") for p in check_engine(cfg, 2))  # autocast works everywhere


def test_cast_params_keeps_buffers_and_batchnorm_in_fp32():
    from dist_opt.config.precision import PrecisionConfig
    from dist_opt.engine.precision import cast_params

    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    cast_params(model, PrecisionConfig(params="bf16", compute="bf16"))
    dtypes = {
        n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()
    }
    assert dtypes == {
        "0.weight": BF16,
        "0.bias": BF16,
        "1.weight": torch.float32,
        "1.bias": torch.float32,
        "1.running_mean": torch.float32,
        "1.running_var": torch.float32,
    }


def test_shampoo_statistics_are_fp32_with_bf16_parameters():
    model = bf16_model()
    opt = ShardedOptimizer(
        model.named_parameters(), "shampoo", lr=0.01, precondition_frequency=2, max_preconditioner_dim=8
    )
    for step in range(3):
        x, y = batch(step)
        with autocast():
            loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        assert opt.step() is True
        opt.zero_grad()

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, list | tuple):
            for v in obj:
                yield from tensors(v)

    stats = [t for t in tensors(opt.rule.rule_state_dict()) if t.is_floating_point()]
    assert stats and {t.dtype for t in stats} == {torch.float32}
    assert all(p.dtype == BF16 for p in model.parameters())


def _swa_bf16(rank: int, world: int, out: str) -> dict:
    from dist_opt.trainer import Trainer

    cfg = load_config(
        None,
        [
            "task.name=digits", "task.batchnorm=true", "task.hidden=16", "train.steps=null", "train.epochs=3",
            "data.global_batch=48", "data.micro_batch=24", "swa.enabled=true", "swa.start_epoch=1",
            "precision.params=bf16", "precision.compute=bf16", "optimizer.name=momentum", "optimizer.lr=0.1",
            "train.eval_every=0", "train.progress=false", "tracking.wandb.mode=disabled",
            "checkpoint.at_end=false", f"run.out_dir={out}",
        ],
    )  # fmt: skip
    trainer = Trainer(cfg, torch.device("cpu"))
    trainer.fit()
    swa = next(e for e in trainer.extensions if type(e).__name__ == "SWAExtension")
    return {"avg_dtype": swa.avg.dtype, "n": swa.n}


def test_swa_average_of_a_bf16_model_is_fp32_and_its_bn_refresh_runs_under_autocast(tmp_path):
    res = in_process(_swa_bf16, str(tmp_path / "run"))
    assert res["avg_dtype"] == torch.float32 and res["n"] == 2
    exported = torch.load(tmp_path / "run" / "swa_model.pt", weights_only=True)
    assert exported["fc1.weight"].dtype == torch.bfloat16  # exported in the model's own dtypes
    assert exported["bn1.running_mean"].dtype == torch.float32
