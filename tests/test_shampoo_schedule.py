"""Shampoo's staggered root refreshes, its state accounting and the bfloat16 preconditioning option."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from dist_opt.engine.sharded import ShardedOptimizer
from dist_opt.optim.shampoo.schedule import phase_loads, refresh_phases, refreshes_at


def _blocks_per_step(phases: dict[str, int], frequency: int) -> list[int]:
    per = [0] * frequency
    for p in phases.values():
        per[p] += 1
    return per


@pytest.mark.parametrize(("blocks", "frequency"), [(48, 100), (300, 100), (7, 3), (100, 100)])
def test_equal_blocks_refresh_at_most_ceil_blocks_over_frequency_per_step(blocks, frequency):
    costs = {f"layer{i}/0": 12.0 * (1024**3 + 512**3) for i in range(blocks)}
    phases = refresh_phases(costs, frequency)
    assert all(0 <= p < frequency for p in phases.values())
    assert max(_blocks_per_step(phases, frequency)) <= math.ceil(blocks / frequency)
    assert phases == refresh_phases(dict(reversed(list(costs.items()))), frequency)  # order-independent
    if blocks < frequency:  # the used phases are spread over the period, not bunched at its start
        used = sorted(set(phases.values()))
        assert used[-1] >= frequency - math.ceil(frequency / blocks)


def test_mixed_blocks_root_work_per_step_is_balanced():
    rnd = random.Random(0)
    costs = {f"b{i}": float(sum(rnd.choice([16, 128, 512, 1024]) ** 3 for _ in range(2))) for i in range(500)}
    costs["bias/0"] = 0.0  # diagonal blocks have no roots
    phases = refresh_phases(costs, 50)
    keys = list(costs)
    loads = phase_loads([costs[k] for k in keys], [phases[k] for k in keys], 50)
    assert max(loads) <= sum(costs.values()) / 50 + max(costs.values())
    assert phases["bias/0"] == 0


def test_every_block_refreshes_on_start_then_once_per_period():
    start, f = 5, 4
    for phase in range(f):
        steps = [t for t in range(1, start + 3 * f + 1) if refreshes_at(t, phase, start, f)]
        assert steps[0] == start
        later = [t for t in steps if t > start]
        assert all(b - a == f for a, b in zip(later, later[1:], strict=False))
        assert later[0] - start == (phase or f)


# -- inside the rule (one process) ----------------------------------------------------------------
def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))


def _train(steps: int, **hp) -> tuple[nn.Module, ShardedOptimizer, list[set[str]]]:
    model = _model()
    opt = ShardedOptimizer(model.named_parameters(), "shampoo", lr=0.01, max_preconditioner_dim=8, **hp)
    g = torch.Generator().manual_seed(1)
    refreshed = []
    for _ in range(steps):
        x, y = torch.randn(32, 12, generator=g), torch.randn(32, 1, generator=g)
        nn.functional.mse_loss(model(x), y).backward()
        before = {k: [id(r) for r in st.roots] for k, st in opt.rule.state.items()} if opt.rule.plan else {}
        opt.step()
        opt.zero_grad()
        changed = {k for k, st in opt.rule.state.items() if [id(r) for r in st.roots] != before.get(k, [])}
        refreshed.append({k for k in changed if opt.rule.state[k].factors})
    return model, opt, refreshed


def test_rule_refreshes_exactly_the_scheduled_blocks():
    start, f = 2, 5
    _, opt, refreshed = _train(start + 2 * f, precondition_frequency=f, start_preconditioning_step=start)
    rule = opt.rule
    matrix = {b.key for b in rule.plan if not b.diagonal}
    assert refreshed[start - 1] == matrix  # step `start`: every root once
    for t in range(start + 1, start + 2 * f + 1):
        assert refreshed[t - 1] == {b.key for b in rule.refreshing(t)}, t
        assert len(refreshed[t - 1]) <= math.ceil(len(matrix) / f) + 1
    assert set().union(*refreshed[start : start + f]) == matrix  # each once per period


def test_state_bytes_counts_every_block_tensor():
    _, opt, _ = _train(3, precondition_frequency=2, preconditioner_dtype="bfloat16")
    rule = opt.rule
    expect = 0
    for st in rule.state.values():
        tensors = st.factors + [r for r in st.roots + st.mm_roots if r is not None]
        tensors += [t for t in (st.momentum, st.graft) if t is not None]
        expect += sum(t.numel() * t.element_size() for t in tensors)
    assert expect > 0 and rule.state_bytes() == expect
    engine_own = sum(t.numel() * t.element_size() for v in opt.shard_state.values() for t in v)
    assert opt.state_bytes() == expect + engine_own > 0


def test_bfloat16_preconditioning_runs_and_stays_close_to_float32():
    hp = {"precondition_frequency": 3, "start_preconditioning_step": 2}
    m32, _, _ = _train(12, **hp)
    m16, opt16, _ = _train(12, preconditioner_dtype="bfloat16", **hp)
    st = next(s for s in opt16.rule.state.values() if s.factors)
    assert all(h.dtype == torch.float32 for h in st.factors)
    assert all(r.dtype == torch.float32 for r in st.roots if r is not None)
    assert st.mm_roots and all(r.dtype == torch.bfloat16 for r in st.mm_roots if r is not None)
    start = _model()
    diff = moved = 0.0
    for a, b, s in zip(m32.parameters(), m16.parameters(), start.parameters(), strict=True):
        assert torch.isfinite(b).all()
        diff += float((a - b).detach().square().sum())
        moved += float((a - s).detach().square().sum())
    assert diff**0.5 <= 0.1 * moved**0.5, (diff**0.5, moved**0.5)  # bf16 rounding perturbs the steps a little
    # a checkpoint of the bf16 run restores its low-precision root copies
    sd = opt16.state_dict()
    model = _model()
    opt = ShardedOptimizer(
        model.named_parameters(),
        "shampoo",
        lr=0.01,
        max_preconditioner_dim=8,
        preconditioner_dtype="bfloat16",
        **hp,
    )
    opt.load_state_dict(sd)
    x, y = torch.randn(32, 12), torch.randn(32, 1)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    st2 = opt.rule.state[next(k for k, s in opt16.rule.state.items() if s.factors)]
    assert st2.mm_roots and all(r is None or r.dtype == torch.bfloat16 for r in st2.mm_roots)
