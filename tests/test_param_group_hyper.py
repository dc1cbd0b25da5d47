"""Param groups carry ``momentum`` / ``betas`` as torch.optim's do, and the rules read them at every
step: torch's momentum-cycling schedulers (OneCycleLR, CyclicLR) drive dist-opt optimizers exactly
as they drive torch.optim, and checkpoints restore the cycled values."""

from __future__ import annotations

import copy

import pytest
import torch
from reference_optim import RefLAMB
from test_engine_exact import batch, make_model
from torch import nn
from torch.optim.lr_scheduler import CyclicLR, OneCycleLR

from dist_opt.engine.sharded import ShardedOptimizer
from dist_opt.integrations.pieces import LocalRuleOptimizer
from dist_opt.optim.registry import build_rule

WD = 0.01
STEPS = 12
CYCLE = {"max_lr": 0.05, "total_steps": STEPS, "cycle_momentum": True}


def sharded(name: str, lr: float = 0.01, **hyper) -> tuple[nn.Module, ShardedOptimizer]:
    """A world of one (no process group): the engine's own step sequence on whole shards."""
    model = make_model()
    opt = ShardedOptimizer(
        model.named_parameters(),
        name,
        lr=lr,
        weight_decay=WD,
        zero_stage=1,
        bucket_mb=60 * 4 / 2**20,
        **hyper,
    )
    return model, opt


def torch_groups(model: nn.Module) -> list[dict]:
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": WD},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def train(model: nn.Module, opt, sched, steps: range, seen: list | None = None) -> None:
    for step in steps:
        x, y = batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if seen is not None:
            g = opt.param_groups[0]
            seen.append(g["momentum"] if "momentum" in g else g["betas"][0])


def assert_params_close(a: nn.Module, b: nn.Module, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    for (n, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=n)


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(
        float((x - y).detach().abs().max()) for x, y in zip(a.parameters(), b.parameters(), strict=True)
    )


# -- the groups' keys are torch.optim's ------------------------------------------------------------
TORCH = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.1),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.1),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.1),
}
BUILT = {"lars": {"momentum": 0.9}, "lamb": {"betas": (0.9, 0.999)}, "shampoo": {"betas": (0.9, 1.0)}}


@pytest.mark.parametrize("name", list(TORCH) + list(BUILT))
def test_groups_and_defaults_carry_momentum_or_betas_like_torch(name):
    _, opt = sharded(name, lr=0.1)
    if name in TORCH:
        ref = TORCH[name](make_model().parameters())
        want = {k: ref.param_groups[0][k] for k in ("momentum", "betas") if k in ref.param_groups[0]}
    else:
        want = BUILT[name]
    assert len(opt.param_groups) == 2  # weight-decayed matrices, 1-D parameters
    for g in opt.param_groups:
        assert {k: g[k] for k in ("momentum", "betas") if k in g} == want
        assert all(type(v) is type(want[k]) for k, v in want.items())  # betas a tuple, as in torch
    assert {k: opt.defaults[k] for k in ("momentum", "betas") if k in opt.defaults} == want


def test_built_values_reach_the_groups():
    _, opt = sharded("momentum", momentum=0.7)
    assert [g["momentum"] for g in opt.param_groups] == [0.7, 0.7]
    _, opt = sharded("lamb", betas=(0.8, 0.99))
    assert [g["betas"] for g in opt.param_groups] == [(0.8, 0.99), (0.8, 0.99)]


# -- OneCycleLR cycles them: equal to torch.optim driven by the same schedule -------------------------
@pytest.mark.parametrize(
    ("name", "make_ref"),
    [
        ("momentum", lambda gs: torch.optim.SGD(gs, lr=0.01, momentum=0.9)),
        ("nesterov", lambda gs: torch.optim.SGD(gs, lr=0.01, momentum=0.9, nesterov=True)),
        ("adamw", lambda gs: torch.optim.AdamW(gs, lr=0.01)),
        ("adam", lambda gs: torch.optim.Adam(gs, lr=0.01)),
    ],
)
def test_one_cycle_momentum_equals_torch_optim(name, make_ref):
    model, opt = sharded(name)
    sched = OneCycleLR(opt, **CYCLE)
    ref_model = make_model()
    ref_opt = make_ref(torch_groups(ref_model))
    ref_sched = OneCycleLR(ref_opt, **CYCLE)
    seen, ref_seen = [], []
    train(model, opt, sched, range(STEPS - 1), seen)
    train(ref_model, ref_opt, ref_sched, range(STEPS - 1), ref_seen)
    assert seen == ref_seen
    assert seen[0] < 0.95 and len(set(seen)) == len(seen)  # the momentum really moved every step
    assert_params_close(model, ref_model)
    # and it mattered: torch with the momentum held fixed ends elsewhere
    fixed_model = make_model()
    fixed_opt = make_ref(torch_groups(fixed_model))
    train(
        fixed_model, fixed_opt, OneCycleLR(fixed_opt, **{**CYCLE, "cycle_momentum": False}), range(STEPS - 1)
    )
    assert max_diff(model, fixed_model) > 100 * max_diff(model, ref_model)


def test_cyclic_lr_momentum_equals_torch_optim():
    kw = {"base_lr": 0.01, "max_lr": 0.05, "step_size_up": 3, "base_momentum": 0.5, "max_momentum": 0.9}
    model, opt = sharded("momentum")
    ref_model = make_model()
    ref_opt = torch.optim.SGD(torch_groups(ref_model), lr=0.01, momentum=0.9)
    seen, ref_seen = [], []
    train(model, opt, CyclicLR(opt, **kw), range(8), seen)
    train(ref_model, ref_opt, CyclicLR(ref_opt, **kw), range(8), ref_seen)
    assert seen == ref_seen and min(seen) == 0.5
    assert_params_close(model, ref_model)


def test_one_cycle_drives_lamb_betas_like_the_reference_with_those_betas():
    model, opt = sharded("lamb")
    sched = OneCycleLR(opt, **CYCLE)
    ref_model = make_model()
    params = list(ref_model.parameters())
    ref = RefLAMB(params, lr=0.0, weight_decay=WD, excluded=[i for i, p in enumerate(params) if p.ndim <= 1])
    betas = []
    for step in range(STEPS - 1):
        g = opt.param_groups[0]
        ref.lr, ref.betas = g["lr"], g["betas"]  # what the group holds for this step
        betas.append(g["betas"][0])
        x, y = batch(step)
        for p in params:
            p.grad = None
        nn.functional.mse_loss(ref_model(x), y).backward()
        ref.step()
        train(model, opt, sched, range(step, step + 1))
    assert len(set(betas)) == len(betas) and opt.param_groups[0]["betas"][1] == 0.999
    assert_params_close(model, ref_model)


def test_changing_lamb_beta1_in_the_group_changes_the_next_update():
    """One step with betas[0] set to 0.5 in the groups equals the LAMB reference with beta1 0.5 and
    differs from the step with the built 0.9."""
    model, opt = sharded("lamb")
    train(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), range(3))
    out = {}
    for b1 in (0.9, 0.5):
        # the trained parameters and moments, then beta1 set in every group
        m, o = sharded("lamb")
        with torch.no_grad():
            for p, q in zip(m.parameters(), model.parameters(), strict=True):
                p.copy_(q)
        o.load_state_dict(opt.state_dict())
        for g in o.param_groups:
            g["betas"] = (b1, g["betas"][1])
        # the reference, from the same moments
        ref_m = copy.deepcopy(m)
        params = list(ref_m.parameters())
        ref = RefLAMB(
            params,
            lr=0.01,
            betas=(b1, 0.999),
            weight_decay=WD,
            excluded=[i for i, p in enumerate(params) if p.ndim <= 1],
        )
        sd = opt.sharded_state()
        names = [n for n, _ in ref_m.named_parameters()]
        ref.m = [sd[n]["exp_avg"].view_as(p).clone() for n, p in zip(names, params, strict=True)]
        ref.v = [sd[n]["exp_avg_sq"].view_as(p).clone() for n, p in zip(names, params, strict=True)]
        ref.t = 3
        x, y = batch(3)
        for mm in (m, ref_m):
            nn.functional.mse_loss(mm(x), y).backward()
        o.step()
        ref.step()
        assert_params_close(m, ref_m)
        out[b1] = m
    assert max_diff(out[0.9], out[0.5]) > 1e-4


# -- every engine optimizer ------------------------------------------------------------------------
def test_deepspeed_piece_optimizer_follows_one_cycle_like_torch():
    """The client optimizer DeepSpeed ZeRO-1/2 steps (groups from the same builder)."""
    model = make_model()
    opt = LocalRuleOptimizer(model.named_parameters(), build_rule("adamw"), lr=0.01)
    assert "betas" in opt.defaults and all(g["betas"] == (0.9, 0.999) for g in opt.param_groups)
    ref_model = make_model()
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=0.01, weight_decay=0.0)
    seen, ref_seen = [], []
    train(model, opt, OneCycleLR(opt, **CYCLE), range(6), seen)
    train(ref_model, ref_opt, OneCycleLR(ref_opt, **CYCLE), range(6), ref_seen)
    assert seen == ref_seen
    assert_params_close(model, ref_model)


def test_shampoo_reads_betas_from_the_group():
    """Shampoo built with (0.9, 1.0) whose groups say (0.8, 0.99) equals Shampoo built with (0.8, 0.99)."""
    runs = []
    for built, group in (((0.9, 1.0), (0.8, 0.99)), ((0.8, 0.99), None), ((0.9, 1.0), None)):
        model, opt = sharded("shampoo", betas=built, precondition_frequency=2, max_preconditioner_dim=8)
        if group is not None:
            for g in opt.param_groups:
                g["betas"] = group
        train(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), range(5))
        runs.append(model)
    assert_params_close(runs[0], runs[1], rtol=0, atol=0)
    assert max_diff(runs[0], runs[2]) > 1e-5


@pytest.mark.parametrize(
    ("name", "key"), [("rmsprop", "momentum"), ("sgd", "momentum"), ("lars", "momentum")]
)
def test_scheduling_a_momentum_the_rule_was_built_without_is_refused(name, key):
    model, opt = sharded(name, **({"momentum": 0.0} if name == "lars" else {}))
    assert opt.param_groups[0][key] == 0.0
    sched = OneCycleLR(opt, **CYCLE)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="keeps no buffer"):
        train(model, opt, sched, range(1))
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)  # refused before any parameter moved


# -- checkpoints restore the cycled values ---------------------------------------------------------
@pytest.mark.parametrize("name", ["momentum", "adamw", "lamb"])
def test_resume_mid_cycle_is_exact(name):
    model, opt = sharded(name)
    sched = OneCycleLR(opt, **CYCLE)
    train(model, opt, sched, range(5))
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    saved_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    cycled = [{k: g[k] for k in ("momentum", "betas") if k in g} for g in opt.param_groups]
    train(model, opt, sched, range(5, STEPS - 1))

    resumed, ropt = sharded(name)
    rsched = OneCycleLR(ropt, **CYCLE)  # sets the groups to the cycle's start
    with torch.no_grad():
        for n, p in resumed.named_parameters():
            p.copy_(saved_params[n])
    ropt.load_state_dict(saved_opt)
    rsched.load_state_dict(saved_sched)
    assert [{k: g[k] for k in ("momentum", "betas") if k in g} for g in ropt.param_groups] == cycled
    train(resumed, ropt, rsched, range(5, STEPS - 1))
    assert_params_close(resumed, model, rtol=0, atol=0)


def test_checkpoint_without_the_keys_still_loads():
    _, opt = sharded("adamw")
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["betas"]
    _, fresh = sharded("adamw", betas=(0.8, 0.9))
    fresh.load_state_dict(sd)
    assert all(g["betas"] == (0.8, 0.9) for g in fresh.param_groups)
    # a saved list (e.g. from JSON) comes back as a tuple
    sd["param_groups"][0]["betas"] = [0.7, 0.9]
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["betas"] == (0.7, 0.9)
