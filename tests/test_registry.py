"""Adding an optimizer is one rule class plus one ``register_rule`` call, and everything follows.

A toy signSGD/Signum rule (Bernstein et al. 2018) is defined and registered here only: it becomes a
valid ``optimizer.name``, its keys are validated, the engines accept or refuse it by its declared
capabilities, and its sharded updates on 1 and 2 gloo ranks equal a hand-written single-process
reference at every ZeRO stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import nn

from dist_opt.config import ConfigError, load_config
from dist_opt.integrations import check_engine_combination
from dist_opt.optim.base import GroupShard, Rule, StepContext
from dist_opt.optim.registry import (
    RuleSpec,
    build_rule,
    declared_keys,
    register_rule,
    rule_names,
    structural_keys,
    unregister_rule,
)

STEPS, LR, WD, MU = 6, 0.01, 0.01, 0.9


class SignSGD(Rule):
    """d = g + wd·p;  m = μ·m + (1-μ)·d (μ > 0);  p -= lr·sign(m or d)."""

    def __init__(self, *, momentum: float):
        self.momentum = momentum
        self.state_names = ("momentum_buffer",) if momentum else ()

    def step(self, groups: Sequence[GroupShard], ctx: StepContext) -> None:
        for g in groups:
            d = torch._foreach_add(g.grads, g.params, alpha=g.hp["weight_decay"])
            if self.momentum:
                torch._foreach_lerp_(g.state["momentum_buffer"], d, 1.0 - self.momentum)
                d = g.state["momentum_buffer"]
            torch._foreach_add_(g.params, [x.sign() for x in d], alpha=-g.hp["lr"])


# the one registration line (its own module would do it at import)
SIGNSGD = RuleSpec("signsgd", SignSGD, "signSGD / Signum.", hyper={"momentum": 0.0}, elementwise=True)


def _register() -> None:
    register_rule(SIGNSGD, replace=True)  # also in spawned ranks, which import this module afresh


@pytest.fixture(autouse=True)
def signsgd():
    _register()
    yield
    for name in ("signsgd", "layersign", "wholesign", "liar"):
        unregister_rule(name)


# -- registered, selectable, its keys validated --------------------------------------------------------
def test_registered_and_selectable_by_name():
    assert "signsgd" in rule_names()
    cfg = load_config(None, ["optimizer.name=signsgd", "optimizer.momentum=0.9"])
    assert cfg.optimizer.name == "signsgd" and cfg.optimizer.momentum == 0.9
    rule = build_rule("signsgd", momentum=None)  # None: the declared default
    assert isinstance(rule, SignSGD) and rule.momentum == 0.0 and rule.state_names == ()
    assert structural_keys("signsgd") == ("name",)
    unregister_rule("signsgd")
    with pytest.raises(ConfigError, match="optimizer.name: unknown optimizer"):
        load_config(None, ["optimizer.name=signsgd"])


def test_keys_it_does_not_read_are_refused():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optimizer.name=signsgd", "optimizer.betas=[0.5, 0.5]", "optimizer.eps=0.1"])
    assert [p.split(":")[0] for p in e.value.problems] == ["optimizer.betas", "optimizer.eps"]
    assert "does not apply to optimizer.name=signsgd" in e.value.problems[0]
    assert "signsgd's own keys: momentum" in e.value.problems[0]
    with pytest.raises(ValueError, match="optimizer.betas: does not apply"):
        build_rule("signsgd", betas=(0.5, 0.5))
    with pytest.raises(ValueError, match="optimizer.bogus: unknown optimizer key"):
        build_rule("signsgd", bogus=1)
    build_rule("signsgd", lr=0.1, betas=None)  # generic keys and unset keys are fine


def test_bad_declarations_are_refused():
    with pytest.raises(ValueError, match="optimizer.sign_eps is not a declared key"):
        register_rule(RuleSpec("liar", SignSGD, hyper={"sign_eps": 0.0}))
    with pytest.raises(ValueError, match="already registered"):
        register_rule(RuleSpec("adam", SignSGD))
    with pytest.raises(ValueError, match="elementwise rule cannot"):
        register_rule(RuleSpec("liar", SignSGD, elementwise=True, trust_ratio=True))
    assert "sign_eps" not in declared_keys()
    register_rule(
        RuleSpec("liar", SignSGD, hyper={"momentum": 0.0}, trust_ratio=True)
    )  # the class says otherwise
    with pytest.raises(TypeError, match="declared trust_ratio=True but its rule has uses_trust_ratio=False"):
        build_rule("liar")


# -- engines accept or refuse it by its capabilities ----------------------------------------------------
class WholeSignSGD(SignSGD):
    replicated_pieces = True


def _engine_problems(name: str, engine: str, stage: int) -> list[str]:
    cfg = load_config(
        None, [f"optimizer.name={name}", f"distributed.engine={engine}", f"distributed.zero_stage={stage}"]
    )
    return [p for p in check_engine_combination(cfg, 2) if p.startswith("optimizer.name")]


def test_engine_checks_follow_the_declared_capabilities():
    register_rule(RuleSpec("layersign", SignSGD, hyper={"momentum": 0.0}))  # not elementwise
    register_rule(RuleSpec("wholesign", WholeSignSGD, hyper={"momentum": 0.0}, whole_tensors=True))
    for stage in (0, 1, 2):  # elementwise: DeepSpeed may hand it flat ZeRO partitions
        assert _engine_problems("signsgd", "deepspeed", stage) == []
    assert _engine_problems("signsgd", "fsdp2", 0) == []
    assert _engine_problems("layersign", "deepspeed", 0) == []
    (msg,) = _engine_problems("layersign", "deepspeed", 1)
    assert "layersign is not supported" in msg and "flattens all parameters" in msg
    assert _engine_problems("layersign", "fsdp2", 0) == []
    (msg,) = _engine_problems("wholesign", "deepspeed", 2)
    assert "whole-parameter" in msg
    (msg,) = _engine_problems("wholesign", "fsdp2", 0)
    assert "wholesign is not supported" in msg and "span the dim-0 shards" in msg
    assert build_rule("wholesign").replicated_pieces


# -- its updates on 1 and 2 gloo ranks equal a hand-written reference -----------------------------------
def make_model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)


def train_sharded(rank: int, world: int) -> dict[int, list[torch.Tensor]]:
    from dist_opt.engine.build import build_optimizer

    _register()
    out = {}
    for stage in (0, 1, 2):
        cfg = load_config(
            None,
            [
                "optimizer.name=signsgd",
                f"optimizer.momentum={MU}",
                f"optimizer.weight_decay={WD}",
                f"distributed.zero_stage={stage}",
            ],
        )
        model = make_model()
        opt = build_optimizer(model, cfg, LR)
        assert isinstance(opt.rule, SignSGD) and opt.rule.momentum == MU
        for step in range(STEPS):
            x, y = batch(step)
            m = x.shape[0] // world
            nn.functional.mse_loss(
                model(x[rank * m : (rank + 1) * m]), y[rank * m : (rank + 1) * m]
            ).backward()
            assert opt.step() is True
            opt.zero_grad()
        out[stage] = [p.detach().clone() for p in model.parameters()]
    return out


def reference() -> list[torch.Tensor]:
    model = make_model()
    params = list(model.parameters())
    bufs = [torch.zeros_like(p) for p in params]
    for step in range(STEPS):
        x, y = batch(step)
        for p in params:
            p.grad = None
        nn.functional.mse_loss(model(x), y).backward()
        with torch.no_grad():
            for p, b in zip(params, bufs, strict=True):
                d = p.grad + (WD if p.ndim > 1 else 0.0) * p  # 1-D parameters get no weight decay
                b.copy_(MU * b + (1 - MU) * d)
                p -= LR * torch.sign(b)
    return [p.detach().clone() for p in params]


def test_sharded_updates_equal_the_reference_on_1_and_2_ranks(world2):
    ref = reference()
    results = {1: [train_sharded(0, 1)], 2: world2.run(train_sharded)}
    for world, per_rank in results.items():
        for rank, res in enumerate(per_rank):
            for stage, got in res.items():
                for i, (a, b) in enumerate(zip(got, ref, strict=True)):
                    torch.testing.assert_close(
                        a,
                        b,
                        msg=lambda m, i=i, w=world, r=rank, s=stage: (
                            f"param {i}, world {w}, rank {r}, stage {s}: {m}"
                        ),
                    )
