"""Sharded engine features: the pseudo-code errata of docs/algorithms.md, zero-norm guards, non-finite skip, clipping on the
reduced gradient, one all-reduce for all layer norms, communication volume, state memory and
state_dict resharding."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from reference_optim import RefLAMB
from test_engine_exact import batch, make_model
from torch import nn

from dist_opt.engine.sharded import ShardedOptimizer
from dist_opt.optim.base import GroupShard, local_context
from dist_opt.optim.registry import build_rule


def one_tensor_step(
    rule_name: str,
    p: torch.Tensor,
    g: torch.Tensor,
    lr: float = 1.0,
    wd: float = 0.0,
    trust: bool = True,
    steps: int = 1,
    **hp,
):
    rule = build_rule(rule_name, **hp)
    state = rule.init_state([p])
    for t in range(1, steps + 1):
        grp = GroupShard(
            hp={"lr": lr, "weight_decay": wd, "trust": trust},
            layers=[0],
            params=[p],
            grads=[g],
            state=state,
            shapes=[tuple(p.shape)],
        )
        ctx = local_context(t, 1)
        rule.step([grp], ctx)
    return state, ctx


# --- pseudo-code errata (docs/algorithms.md, section 3): each line of the table--------------------------------------------------
def test_lamb_second_moment_uses_squared_gradient():
    g = torch.tensor([0.5, -2.0, 3.0])
    state, _ = one_tensor_step("lamb", torch.ones(3), g)
    torch.testing.assert_close(state["exp_avg_sq"][0], (1 - 0.999) * g * g)


def test_lamb_bias_correction_does_not_rescale_state():
    g = torch.tensor([0.5, -2.0, 3.0])
    state, _ = one_tensor_step("lamb", torch.ones(3), g)
    torch.testing.assert_close(state["exp_avg"][0], (1 - 0.9) * g)  # not g / (1 - 0.9) * (1 - 0.9)


def test_lamb_eps_outside_the_root():
    # step 1: m̂ = g, v̂ = g², r = g/(|g| + ε). With ε inside the root r would be g/sqrt(g² + ε).
    g = torch.tensor([1e-3])
    p = torch.tensor([2.0])
    p0 = p.clone()
    eps = 1e-6
    one_tensor_step("lamb", p, g, lr=1.0, trust=False, eps=eps)
    torch.testing.assert_close(p0 - p, g / (g.abs() + eps))
    assert abs(float(p0 - p) - float(g / torch.sqrt(g * g + eps))) > 0.1


def test_lars_uses_the_global_learning_rate():
    g = torch.tensor([0.3, -0.4])
    moves = []
    for lr in (1.0, 0.1):
        p = torch.tensor([3.0, 4.0])
        one_tensor_step("lars", p, g.clone(), lr=lr, momentum=0.0)
        moves.append(torch.tensor([3.0, 4.0]) - p)
    torch.testing.assert_close(moves[1], 0.1 * moves[0])
    # λ = η‖p‖/‖g‖ = 0.001·5/0.5: the step is lr·λ·g
    torch.testing.assert_close(moves[0], 0.001 * 5 / 0.5 * g)


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_zero_norm_guard_moves_zero_layer_without_nan(name):
    p = torch.zeros(4)
    g = torch.tensor([0.1, -0.2, 0.3, 0.0])
    _, ctx = one_tensor_step(name, p, g, lr=0.1, wd=0.01)
    assert torch.isfinite(p).all() and torch.count_nonzero(p) == 3
    assert float(ctx.stats["trust_ratios"][0]) == 1.0
    # zero gradient: ratio 1, nothing NaN
    p2 = torch.ones(4)
    _, ctx = one_tensor_step(name, p2, torch.zeros(4), lr=0.1)
    assert torch.isfinite(p2).all() and float(ctx.stats["trust_ratios"][0]) == 1.0


def test_adam_defaults_are_the_papers():
    rule = build_rule("adam")
    assert rule.betas == (0.9, 0.999) and rule.eps == 1e-8 and rule.bias_correction
    assert build_rule("lamb").eps == 1e-6


def test_adam_bias_correction_and_its_option():
    g = torch.tensor([0.01, -0.02])
    p = torch.zeros(2)
    one_tensor_step("adam", p, g, lr=0.1)
    torch.testing.assert_close(p, -0.1 * torch.sign(g), rtol=1e-5, atol=1e-7)  # first step ≈ lr·sign(g)
    p = torch.zeros(2)
    one_tensor_step("adam", p, g, lr=0.1, bias_correction=False)
    m, v = 0.1 * g, 0.001 * g * g
    torch.testing.assert_close(p, -0.1 * m / (v.sqrt() + 1e-8))


def test_lars_tf_denominator_option():
    p = torch.tensor([3.0, 4.0])
    g = torch.tensor([0.3, -0.4])
    p_tf = p.clone()
    one_tensor_step("lars", p, g.clone(), lr=1.0, wd=0.1, momentum=0.0)
    one_tensor_step("lars", p_tf, g.clone(), lr=1.0, wd=0.1, momentum=0.0, lars_denominator="tf")
    d = g + 0.1 * torch.tensor([3.0, 4.0])
    lam_paper = 0.001 * 5 / (0.5 + 0.1 * 5)
    lam_tf = 0.001 * 5 / float(d.norm())
    torch.testing.assert_close(torch.tensor([3.0, 4.0]) - p, lam_paper * d)
    torch.testing.assert_close(torch.tensor([3.0, 4.0]) - p_tf, lam_tf * d)


# --- multi-rank behaviour ------------------------------------------------------------------------
def _model_opt(name: str, stage: int, **kw):
    model = make_model()
    opt = ShardedOptimizer(
        model.named_parameters(),
        name,
        lr=kw.pop("lr", 0.01),
        weight_decay=0.01,
        zero_stage=stage,
        bucket_mb=60 * 4 / 2**20,
        **kw,
    )
    return model, opt


def _backward(model, rank: int, world: int, step: int, poison: bool = False):
    x, y = batch(step)
    m = x.shape[0] // world
    xs = x[rank * m : (rank + 1) * m]
    if poison:
        xs = xs.clone()
        xs[0, 0] = float("nan")
    nn.functional.mse_loss(model(xs), y[rank * m : (rank + 1) * m]).backward()


def nonfinite_skip(rank: int, world: int, stage: int):
    model, opt = _model_opt("adamw", stage)
    _backward(model, rank, world, 0)
    opt.step()
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model, rank, world, 1, poison=rank == world - 1)  # NaN only on the last rank
    applied = opt.step()
    opt.zero_grad()
    same = all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    _backward(model, rank, world, 2)
    applied_after = opt.step()
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    return (
        applied,
        same,
        opt.skipped_steps,
        applied_after,
        finite,
        [p.detach().clone() for p in model.parameters()],
    )


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_nonfinite_gradient_on_one_rank_skips_everywhere(world2, stage):
    res = world2.run(nonfinite_skip, stage)
    for applied, same, skipped, applied_after, finite, _ in res:
        assert applied is False and same and skipped == 1 and applied_after is True and finite
    for a, b in zip(res[0][5], res[1][5], strict=True):
        assert torch.equal(a, b)


def clipped(rank: int, world: int, stage: int):
    model, opt = _model_opt("sgd", stage, lr=0.5, max_grad_norm=0.05)
    for step in range(3):
        _backward(model, rank, world, step)
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], opt.last_stats.get("clip_coef")


@pytest.mark.parametrize("stage", [1, 2])
def test_clipping_uses_the_norm_of_the_reduced_gradient(world2, stage):
    model = make_model()
    params = list(model.parameters())
    decay = [p for p in params if p.ndim > 1]
    ref = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": 0.01},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=0.5,
    )
    for step in range(3):
        x, y = batch(step)
        ref.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.05)
        ref.step()
    for got, coef in world2.run(clipped, stage):
        assert coef is not None and coef < 1
        for a, b in zip(got, params, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def comm_profile(rank: int, world: int, name: str, stage: int):
    model, opt = _model_opt(name, stage)
    _backward(model, rank, world, 0)
    opt.comm.ledger.reset()
    opt.step()
    ledger = copy.deepcopy(opt.comm.ledger)
    _backward(model, rank, world, 1)  # grad comm of the next step happens in backward
    pre = copy.deepcopy(opt.comm.ledger)
    ratios = opt.last_stats.get("trust_ratios")
    return (
        dict(ledger.calls),
        dict(pre.calls),
        dict(pre.bytes),
        len(opt.layout.buckets),
        ratios,
        sum(p.numel() for p in model.parameters()),
        opt.layout.full_numel,
    )


@pytest.mark.parametrize("name, expected_step_all_reduces", [("lamb", 2), ("lars", 2), ("adamw", 1)])
def test_one_all_reduce_for_all_layer_norms(world2, name, expected_step_all_reduces):
    """Inside step(): one small all-reduce for the gradient norm / finiteness, plus (LARS/LAMB) ONE
    for every layer's norms together, however many layers; parameters all-gathered per bucket."""
    for step_calls, _, _, n_buckets, _, _, _ in world2.run(comm_profile, name, 2):
        assert step_calls.get("all_reduce", 0) == expected_step_all_reduces
        assert step_calls.get("all_gather", 0) == n_buckets > 1


def test_zero2_traffic_is_one_all_reduce_volume(world2):
    step_calls, calls, nbytes, n_buckets, _, _, full_numel = world2.run(comm_profile, "adamw", 2)[0]
    assert calls["reduce_scatter"] == n_buckets
    assert calls.get("all_reduce", 0) == step_calls.get("all_reduce", 0)  # no gradient all-reduce
    # reduce-scatter of the (padded) gradients moves (N-1)/N of them and the all-gather of the
    # parameters the same again: together one all-reduce's bandwidth, not 1.5x (ZeRO)
    assert nbytes["reduce_scatter"] == pytest.approx(full_numel * 4 / 2, rel=0.01)
    assert nbytes["all_gather"] == nbytes["reduce_scatter"]


def test_lamb_trust_ratios_under_sharding_equal_full_tensor_ones(world2):
    model = make_model()
    params = list(model.parameters())
    excluded = [i for i, p in enumerate(params) if p.ndim <= 1]
    ref = RefLAMB(params, lr=0.01, weight_decay=0.01, excluded=excluded)
    x, y = batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    ref.step()
    names = [n for n, _ in make_model().named_parameters()]
    for _, _, _, _, ratios, _, _ in world2.run(comm_profile, "lamb", 2):
        # the engine's layers are in reverse registration order
        got = {names[len(names) - 1 - i]: float(r) for i, r in enumerate(ratios)}
        for i, n in enumerate(names):
            assert got[n] == pytest.approx(ref.ratios[i], rel=1e-5), n


def state_sizes(rank: int, world: int, stage: int):
    _, opt = _model_opt("adamw", stage)
    return opt.state_bytes()


def test_sharded_state_is_one_over_n(world2):
    full = world2.run(state_sizes, 0)[0]
    for stage in (1, 2):
        per_rank = world2.run(state_sizes, stage)
        n_tensors = len(list(make_model().parameters()))
        padding = n_tensors * 2 * 4 * 2  # < world elements per tensor per state buffer (+ step scalars)
        for b in per_rank:
            assert b <= full / 2 + padding


def train_and_save(rank: int, world: int, name: str, stage: int, steps: int):
    model, opt = _model_opt(name, stage)
    for step in range(steps):
        _backward(model, rank, world, step)
        opt.step()
        opt.zero_grad()
    return opt.state_dict(), {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["adamw", "lamb", "momentum"])
def test_full_state_dict_reshards_to_one_process(world2, name):
    """Save the gathered state on 2 ranks (ZeRO-2), load it in 1 process, continue: equals an
    uninterrupted single-process run."""
    saved_sd, saved_params = world2.run(train_and_save, name, 2, 3)[0]
    model, opt = _model_opt(name, 0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved_params[n])
    opt.load_state_dict(saved_sd)
    ref_model, ref_opt = _model_opt(name, 0)
    for step in range(5):
        x, y = batch(step)
        for mm, o in ((ref_model, ref_opt),) + (((model, opt),) if step >= 3 else ()):
            nn.functional.mse_loss(mm(x), y).backward()
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.applied_steps == 5


def test_state_dict_mismatch_is_refused():
    _, opt = _model_opt("adamw", 0)
    sd = opt.state_dict()
    del sd["state"]["fc1.weight"]
    with pytest.raises(KeyError, match="fc1.weight"):
        opt.load_state_dict(sd)


def test_torch_lr_scheduler_drives_param_groups():
    model, opt = _model_opt("lamb", 0, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    sched.step()
    assert all(math.isclose(g["lr"], 0.05) for g in opt.param_groups)
