"""Sharded optimizer engine == single-process reference, for every optimizer, ZeRO stage,
world size (1, 2, 3: 3 gives uneven splits, layers straddle shard boundaries) and with
gradient accumulation. Elementwise reference: torch.optim. LARS/LAMB reference: per-tensor
implementations of the papers (tests/reference_optim.py)."""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import pytest
import torch
from reference_optim import RefLAMB, RefLARS
from torch import nn

from dist_opt.engine.sharded import ShardedOptimizer

STEPS = 10  # every rule's state (momenta, second moments, bias correction) is well past its first step
GLOBAL_BATCH = 12
WD = 0.01
LR = {
    "sgd": 0.1,
    "momentum": 0.05,
    "nesterov": 0.05,
    "adagrad": 0.05,
    "rmsprop": 0.003,
    "adam": 0.01,
    "adamw": 0.01,
    "lars": 0.2,
    "lamb": 0.01,
}
OPTIMIZERS = list(LR)
# (world, accumulation) pairs: micro batch = 12 / (world * accumulation)
SHAPES = {1: [(1, 1), (1, 3)], 2: [(2, 1), (2, 2)], 3: [(3, 1), (3, 2)]}


def make_model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(
        OrderedDict(fc1=nn.Linear(7, 13), ln=nn.LayerNorm(13), act=nn.Tanh(), fc2=nn.Linear(13, 5))
    )
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4 + (1.0 if name == "ln.weight" else 0.0))
        m.fc2.bias.zero_()  # a zero-initialised layer must still move (zero-norm guard)
    return m


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 7, generator=g), torch.randn(GLOBAL_BATCH, 5, generator=g)


def sharded_opt(model: nn.Module, name: str, stage: int) -> ShardedOptimizer:
    return ShardedOptimizer(
        model.named_parameters(),
        name,
        lr=LR[name],
        weight_decay=WD,
        zero_stage=stage,
        bucket_mb=200 * 4 / 2**20,
    )  # tiny buckets: several per step


def micro_steps(
    model: nn.Module, opt: ShardedOptimizer, step: int, rank: int, world: int, accum: int, ctx=None
) -> list[float]:
    """Forward/backward of this rank's micro-batches of global step ``step`` (``ctx``: e.g. autocast
    around the forward); gradient sync only on the last one. Returns the micro-batch losses."""
    micro = GLOBAL_BATCH // (world * accum)
    x, y = batch(step)
    losses = []
    for k in range(accum):
        lo = (k * world + rank) * micro
        with ctx() if ctx is not None else contextlib.nullcontext():
            loss = nn.functional.mse_loss(model(x[lo : lo + micro]), y[lo : lo + micro])
        with opt.no_sync() if k < accum - 1 else contextlib.nullcontext():
            loss.backward()
        losses.append(float(loss.detach()))
    return losses


def train_sharded(rank: int, world: int, name: str, stage: int, accum: int) -> list[torch.Tensor]:
    model = make_model()
    opt = sharded_opt(model, name, stage)
    for step in range(STEPS):
        micro_steps(model, opt, step, rank, world, accum)
        assert opt.step() is True
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def reference(name: str) -> list[torch.Tensor]:
    model = make_model()
    params = list(model.parameters())
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}]
    lr = LR[name]
    excluded = [i for i, p in enumerate(params) if p.ndim <= 1]
    opt = {
        "sgd": lambda: torch.optim.SGD(groups, lr=lr),
        "momentum": lambda: torch.optim.SGD(groups, lr=lr, momentum=0.9),
        "nesterov": lambda: torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True),
        "adagrad": lambda: torch.optim.Adagrad(groups, lr=lr),
        "rmsprop": lambda: torch.optim.RMSprop(groups, lr=lr),
        "adam": lambda: torch.optim.Adam(groups, lr=lr),
        "adamw": lambda: torch.optim.AdamW(groups, lr=lr),
        "lars": lambda: RefLARS(params, lr=lr, weight_decay=WD, excluded=excluded),
        "lamb": lambda: RefLAMB(params, lr=lr, weight_decay=WD, excluded=excluded),
    }[name]()
    for step in range(STEPS):
        x, y = batch(step)
        for p in params:
            p.grad = None
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in params]


def run_all(rank: int, world: int) -> dict:
    out = {}
    for name in OPTIMIZERS:
        for stage in (0, 1, 2):
            for _w, accum in SHAPES[world]:
                out[(name, stage, accum)] = train_sharded(rank, world, name, stage, accum)
    return out


_cache: dict = {}


@pytest.fixture(scope="module")
def results(world2, world3):
    if not _cache:
        _cache[1] = run_all(0, 1)
        _cache[2] = world2.run(run_all)
        _cache[3] = world3.run(run_all)
        _cache["ref"] = {name: reference(name) for name in OPTIMIZERS}
    return _cache


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_equals_single_process(results, name, stage, world):
    ref = results["ref"][name]
    per_rank = [results[world]] if world == 1 else results[world]
    for _, accum in SHAPES[world]:
        for rank, res in enumerate(per_rank):
            got = res[(name, stage, accum)]
            for i, (a, b) in enumerate(zip(got, ref, strict=True)):
                torch.testing.assert_close(
                    a,
                    b,
                    rtol=2e-5,
                    atol=2e-6,
                    msg=lambda m, i=i, rank=rank, accum=accum: f"param {i} rank {rank} accum {accum}: {m}",
                )
        if world > 1:  # every rank ends the step with identical full parameters
            for res in per_rank[1:]:
                for a, b in zip(res[(name, stage, accum)], per_rank[0][(name, stage, accum)], strict=True):
                    assert torch.equal(a, b)


def test_zero_initialised_bias_moves_under_trust_ratio_rules(results):
    init = dict(make_model().named_parameters())["fc2.bias"]
    assert torch.count_nonzero(init) == 0
    for name in ("lars", "lamb"):
        for world in (1, 2, 3):
            res = results[world] if world == 1 else results[world][0]
            final = res[(name, 2, SHAPES[world][0][1])][-1]  # fc2.bias is the last parameter
            assert torch.isfinite(final).all()
            assert torch.count_nonzero(final) == final.numel(), (name, world)
