"""The parameter all-gather overlapped with the next forward gives bitwise the same training as the
gather completed inside the step (2 gloo ranks, several buckets, ZeRO-1 and ZeRO-2), and
``wait_params`` / the state API see complete parameters."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from dist_opt.engine.sharded import ShardedOptimizer

STEPS = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )


def _train(rank: int, world: int, name: str, stage: int, overlap: bool) -> dict:
    model = _model()
    opt = ShardedOptimizer(
        model.named_parameters(),
        name,
        lr=0.01,
        weight_decay=0.01,
        zero_stage=stage,
        bucket_mb=120 * 4 / 2**20,  # several buckets
        overlap_param_gather=overlap,
    )
    assert len(opt.layout.buckets) > 2
    g = torch.Generator().manual_seed(rank)
    losses, pending = [], []
    for _ in range(STEPS):
        x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
        pending.append(opt._pgather is not None and opt._pgather.pending)
    state = opt.state_dict()  # the state API waits for the pending gather itself
    after_state = opt._pgather is not None and opt._pgather.pending
    opt.wait_params()
    return {
        "losses": torch.stack(losses),
        "params": [p.detach().clone() for p in model.parameters()],
        "pending": pending,
        "after_state": after_state,
        "state_keys": sorted(state),
    }


def _both(rank: int, world: int, name: str, stage: int) -> tuple[dict, dict]:
    return _train(rank, world, name, stage, False), _train(rank, world, name, stage, True)


@pytest.mark.parametrize("name,stage", [("adamw", 2), ("lamb", 2), ("lars", 1)])
def test_overlapped_gather_is_bitwise_equal_to_blocking(world2, name, stage):
    for plain, over in world2.run(_both, name, stage):
        assert not any(plain["pending"])
        assert all(over["pending"])  # the step returned with the gather still in flight
        assert not over["after_state"]
        assert torch.equal(plain["losses"], over["losses"])
        for a, b in zip(plain["params"], over["params"], strict=True):
            assert torch.equal(a, b)


def _big_allocations(rank: int, world: int, name: str) -> list[int]:
    """Tensors of at least a bucket's shard that backward + step + zero_grad create, per step."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.common import AllocCounter

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(8)])
    opt = ShardedOptimizer(
        model.named_parameters(),
        name,
        lr=0.01,
        weight_decay=0.01,
        zero_stage=2,
        bucket_mb=4 * 64 * 64 * 4 / 2**20,  # 4 layers per bucket: a shard of 32 KiB, a gradient of 16 KiB
        overlap_param_gather=True,
    )
    assert len(opt.layout.buckets) == 2
    shard_bytes = min(b.shard_numel for b in opt.layout.buckets) * 4
    counts = []
    for step in range(4):
        x = torch.randn(8, 64)
        loss = model(x).square().mean()
        with AllocCounter(min_bytes=shard_bytes) as c:
            with opt.no_sync() if step == 1 else contextlib.nullcontext():
                loss.backward()  # step 1: a second micro-step accumulates into the same shard
            if step != 1:
                opt.step()
                opt.zero_grad()
        counts.append(c.count)
    return counts


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_stage2_step_allocates_no_bucket_sized_tensor_after_the_first(world2, name):
    for counts in world2.run(_big_allocations, name):
        # the first step makes the persistent buffers (LAMB's scratch; the accumulation buffers
        # on the first accumulating micro-step); later steps reuse them
        assert counts[3] == 0, counts
        if name == "lamb":  # the counter does see the step: LAMB's scratch is made on the first
            assert counts[0] >= 1, counts
