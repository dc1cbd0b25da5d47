"""The shard core's pure parts (specs, piece loading) without processes, and its public state API
(sharded state, full gather, owned pieces, parameter gather) on real gloo ranks."""

from __future__ import annotations

import pytest
import torch
from test_engine_exact import batch, make_model
from torch import nn

from dist_opt.config import load_config
from dist_opt.dist.collectives import Comm
from dist_opt.engine.core import DEFAULT_EXCLUDE
from dist_opt.engine.partition import make_layout
from dist_opt.engine.sharded import ShardedOptimizer
from dist_opt.engine.state_codec import ShardSpec, all_gather_pieces, gather_full, layout_specs, load_piece

SHAPES = [("a", (5, 3)), ("b", (4,)), ("c", (1,)), ("d", (2, 2, 2))]


def test_specs_are_the_torch_chunk_split_of_each_flattened_parameter():
    for world in (1, 2, 3, 4, 5):
        layout = make_layout(SHAPES, world, 100)
        per_rank = [layout_specs(layout, r) for r in range(world)]
        for i, slot in enumerate(layout.slots):
            got = [specs[i] for specs in per_rank]
            assert all(g.name == slot.name and g.numel == slot.numel and g.shards == world for g in got)
            assert all(g.chunk == -(-slot.numel // world) for g in got)
            covered = [e for g in got for e in range(g.offset, g.end)]
            assert covered == list(range(slot.numel)), (world, slot.name)  # in rank order, no overlap
            pieces = torch.arange(slot.numel).chunk(world)
            for r, p in enumerate(pieces):
                assert (got[r].offset, got[r].end) == (int(p[0]), int(p[-1]) + 1)


def test_load_piece_from_a_full_tensor_or_any_covering_piece():
    full = torch.arange(10.0) + 1
    spec = layout_specs(make_layout([("w", (10,))], 3, 100), 1)[0]  # elements [4, 8) of 10, chunk 4
    assert (spec.offset, spec.valid, spec.chunk) == (4, 4, 4)
    dst = torch.full((spec.chunk,), -1.0)
    load_piece(dst, full.view(2, 5), spec, 0, "w")  # a full tensor of any shape: flattened
    assert torch.equal(dst, full[4:8])
    load_piece(dst, full[3:9], spec, 3, "w")  # a piece of another world size that covers [4, 8)
    assert torch.equal(dst, full[4:8])
    with pytest.raises(ValueError, match=r"w holds 5 elements from offset 5; this rank needs \[4, 8\) of 10"):
        load_piece(dst, full[5:], spec, 5, "w")
    last = layout_specs(make_layout([("w", (10,))], 3, 100), 2)[0]  # [8, 10): 2 valid of a 4-chunk
    padded = torch.full((last.chunk,), 7.0)
    load_piece(padded, full, last, 0, "w")
    assert padded.tolist() == [9.0, 10.0, 0.0, 0.0]  # padding is zeroed
    step = torch.zeros(())
    load_piece(step, torch.tensor(3.0), last, 123, "step")  # 0-d counters are copied as they are
    assert float(step) == 3.0


def test_single_rank_gather_copies_and_fills_plain_or_padded_destinations():
    spec = ShardSpec("w", (2, 3), 6, 0, 6, 6, 1)
    src = torch.arange(6.0)
    out = gather_full(Comm(), [spec], [src])
    assert torch.equal(out[0], src) and out[0].data_ptr() != src.data_ptr()
    dst = torch.zeros(6)
    all_gather_pieces(Comm(), [spec], [src], [dst])
    assert torch.equal(dst, src)


def test_config_default_exclusions_are_the_engine_ones():
    cfg = load_config(None, [])
    assert tuple(cfg.optimizer.exclude_from_weight_decay) == DEFAULT_EXCLUDE
    assert tuple(cfg.optimizer.exclude_from_trust_ratio) == DEFAULT_EXCLUDE


def _trained(name: str, stage: int, world: int, rank: int) -> tuple[nn.Module, ShardedOptimizer]:
    model = make_model()
    opt = ShardedOptimizer(model.named_parameters(), name, lr=0.01, weight_decay=0.01, zero_stage=stage)
    for step in range(2):
        x, y = batch(step)
        micro = len(x) // world
        sl = slice(rank * micro, (rank + 1) * micro)
        nn.functional.mse_loss(model(x[sl]), y[sl]).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_public_state_api_in_one_process():
    model, opt = _trained("adamw", 1, 1, 0)
    specs = opt.shard_specs()
    assert [s.name for s in specs] == [n for n, _ in reversed(list(model.named_parameters()))]
    assert all(s.offset == 0 and s.valid == s.numel and s.shards == 1 for s in specs)
    state = opt.sharded_state()
    assert set(state) == {s.name for s in specs}
    assert all(v.numel() == s.numel for s in specs for v in state[s.name].values() if v.dim())
    fresh = _trained("adamw", 1, 1, 0)[1]
    fresh.load_sharded_state({n: {k: v.clone() for k, v in e.items()} for n, e in state.items()})
    for n, e in fresh.sharded_state().items():
        for k, v in e.items():
            assert torch.equal(v, state[n][k]), (n, k)
    assert opt.state_bytes() == sum(v.numel() * v.element_size() for e in state.values() for v in e.values())
    # owned pieces are views of the live parameters, and gathering pieces sets the parameters
    views = opt.owned_params()
    assert opt.owned_specs() == specs
    assert all(
        v.data_ptr() == p.data_ptr() for v, p in zip(views, reversed(list(model.parameters())), strict=True)
    )
    opt.gather_params([torch.full_like(v, 2.0) for v in views])
    assert all(bool((p == 2.0).all()) for p in model.parameters())


def _distributed_api(rank: int, world: int, stage: int) -> dict:
    model, opt = _trained("lamb", stage, world, rank)
    specs, full = opt.shard_specs(), opt.state_dict()
    pieces = opt.sharded_state()
    for s in specs:  # each rank's piece is its slice of the gathered full state
        for k, v in pieces[s.name].items():
            want = full["state"][s.name][k]
            assert torch.equal(v, want if v.dim() == 0 else want[s.offset : s.end]), (s.name, k)
    owned = opt.owned_specs()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.gather_params([torch.full((s.valid,), float(rank + 1)) for s in owned])
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # back to the trained weights, from this rank's owned views
        opt.gather_params([params[s.name].view(-1)[s.offset : s.end] for s in owned])
    restored = all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    return {
        "shards": [s.shards for s in specs],
        "owned": [(s.offset, s.valid, s.shards) for s in owned],
        "numel": {s.name: s.numel for s in owned},
        "after": after,
        "restored": restored,
    }


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_owned_pieces_split_over_all_ranks_and_gather_back(world2, stage):
    res = world2.run(_distributed_api, stage)
    for r in res:
        assert set(r["shards"]) == {1 if stage == 0 else 2}  # optimizer state: replicated at stage 0
        assert all(shards == 2 for _, _, shards in r["owned"])  # owned pieces: always over both ranks
        assert r["restored"]
    for i, name in enumerate(res[0]["numel"]):
        (o0, v0, _), (o1, v1, _) = res[0]["owned"][i], res[1]["owned"][i]
        assert (o0, o0 + v0, o1 + v1) == (0, o1, res[0]["numel"][name])
        flat = res[0]["after"][name].view(-1)
        assert bool((flat[:v0] == 1.0).all()) and bool((flat[o1:] == 2.0).all()), name
        assert torch.equal(res[0]["after"][name], res[1]["after"][name])
