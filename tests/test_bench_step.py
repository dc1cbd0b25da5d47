"""bench.step end to end at a tiny size: real gloo ranks, the table it writes, and its numbers
checked against what the layout and the ring formulas say they must be."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # spawned ranks inherit sys.path

from bench import step  # noqa: E402
from bench.common import CommCounter, make_25m_model, run_ranks  # noqa: E402

KEYS = ["ddp-adamw", "ddp-adamw-fused", "distopt-adamw-z0", "distopt-adamw-z2"]


def _cells(line: str) -> list[str]:
    assert line.startswith("|") and line.endswith("|"), line
    return [c.strip() for c in line[1:-1].split("|")]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "step.md"
    rows, info, text = step.run_cli(
        ["--quick", "--only", ",".join(KEYS), "--warmup", "1", "--steps", "2", "--out", str(out)]
    )
    return rows, info, text, out


@pytest.mark.timeout(240)
def test_results_table_is_well_formed(quick):
    rows, info, text, out = quick
    assert out.read_text(encoding="utf-8") == text
    assert "Command: `python -m bench.step --quick --only" in text
    lines = text.splitlines()
    start = lines.index(step.TABLE_HEADER)
    header = _cells(lines[start])
    assert len(header) == step.TABLE_COLUMNS
    assert set(_cells(lines[start + 1])) == {"---"}
    body = [_cells(line) for line in lines[start + 2 : start + 2 + len(KEYS)]]
    assert lines[start + 2 + len(KEYS)] == ""  # the table ends there
    labels = {c["key"]: c["label"] for c in step.CONFIGS}
    assert [r[0] for r in body] == [labels[k] for k in KEYS]
    assert all(r["ok"] for r in rows) and [r["key"] for r in rows] == KEYS
    for cells in body:
        assert len(cells) == len(header), cells
        assert re.fullmatch(r"\d+\.\d", cells[1]) and float(cells[1]) > 0, cells  # step ms
        assert re.fullmatch(r"\d+\.\d\d×", cells[2]) and re.fullmatch(r"\d+\.\d\d×", cells[3]), cells
        assert re.fullmatch(r"\d+(\.\d+)? (KiB|MiB|GiB)", cells[4]), cells
        assert re.fullmatch(r"\d+\.\d+ \((28|40)\)", cells[9]), cells
    targets = text[text.index("## Targets") : text.index("## Details")]
    assert re.search(r"^- (PASS|MISS): dist-opt adamw zero 2 step time", targets, re.M)


@pytest.mark.timeout(240)
def test_dist_opt_ratios_are_against_the_baseline_of_the_same_run(quick):
    """Each row's "× DDP+AdamW", "× DDP+AdamW(fused)" and "× unsharded" cells are its own measurement
    divided by the DDP rows' measurements from this very run, and "× bound" is its update time over
    its own bound."""
    rows, _, text, _ = quick
    by = {r["key"]: r for r in rows}
    base, fused = by[step.BASELINE], by[step.FUSED_BASELINE]
    lines = text.splitlines()
    start = lines.index(step.TABLE_HEADER)
    cells = {k: _cells(lines[start + 2 + i]) for i, k in enumerate(KEYS)}
    for key in ("distopt-adamw-z0", "distopt-adamw-z2"):
        r, c = by[key], cells[key]
        for field in ("step_s", "update_s", "bound_s", "state_bytes", "comm_bytes"):
            assert r[field] is not None and math.isfinite(r[field]) and r[field] > 0, (key, field, r[field])
        assert c[1] == f"{1e3 * r['step_s']:.1f}"
        assert c[2] == f"{r['step_s'] / base['step_s']:.2f}×"
        assert c[3] == f"{r['step_s'] / fused['step_s']:.2f}×"
        assert c[5] == f"{r['state_bytes'] / base['state_bytes']:.2f}×"
        assert c[10] == f"{r['update_s'] / r['bound_s']:.2f}×"
    # what the ratios must say whatever the timings: replicated state equals DDP's, ZeRO-2 halves it on 2 ranks
    assert cells["distopt-adamw-z0"][5] == "1.00×"
    assert float(cells["distopt-adamw-z2"][5].rstrip("×")) <= 0.52


@pytest.mark.timeout(240)
def test_numbers_match_layout_and_ring_formulas(quick):
    rows, info, _, _ = quick
    by = {r["key"]: r for r in rows}
    model = make_25m_model(**{k: step.QUICK[k] for k in ("width", "hidden", "blocks")})
    numels = [p.numel() for p in model.parameters()]
    psi, n = sum(numels), len(numels)
    half = sum(math.ceil(k / 2) for k in numels)  # each tensor split in 2 chunks of ceil(numel/2)
    assert by["ddp-adamw"]["params"] == psi
    # AdamW state: exp_avg + exp_avg_sq (4 B each) per element plus a 4-byte step counter per tensor
    assert by["ddp-adamw"]["state_bytes"] == 8 * psi + 4 * n
    assert by["distopt-adamw-z0"]["state_bytes"] == 8 * psi + 4 * n
    assert by["ddp-adamw-fused"]["state_bytes"] == 8 * psi + 4 * n
    assert by["distopt-adamw-z2"]["state_bytes"] == 8 * half + 4 * n
    assert by["distopt-adamw-z2"]["shard_numel"] == half
    # traffic per rank, world 2: all-reduce 2(N-1)/N·S = S, reduce-scatter and all-gather (N-1)/N·S = S/2
    assert by["ddp-adamw"]["comm_bytes"] == 4 * psi
    assert by["distopt-adamw-z0"]["comm_bytes"] == 4 * psi
    # zero 2: reduce-scatter + all-gather of the padded flat buffer, plus one all-reduce of the n
    # float64 squared norms (no extra local-norm entry: noise-scale tracking is off here)
    assert by["distopt-adamw-z2"]["comm_bytes"] == 2 * (4 * 2 * half) // 2 + 8 * n
    for k in ("distopt-adamw-z0", "distopt-adamw-z2"):  # the ledger agrees with the ProcessGroup count
        assert by[k]["comm_bytes"] == by[k]["counted_bytes"]
        assert by[k]["extras"]["skipped_steps"] == 0
    # bound = bytes per parameter x shard elements / measured bandwidth
    r = by["distopt-adamw-z2"]
    assert r["bound_s"] == pytest.approx(28 * half / info["bw"])
    for r in rows:
        assert r["peak_rss"] >= r["rss_setup"] >= r["rss_start"] > 0
        assert math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"])
    # same seed, same data: the loss before any update is the same everywhere
    assert len({round(r["first_loss"], 6) for r in rows}) == 1


def _count_rank(rank: int, world: int) -> tuple[dict, dict]:
    import torch
    import torch.distributed as dist

    a = torch.ones(6)
    with CommCounter(world) as c:
        dist.all_reduce(a)
        out = torch.empty(3)
        dist.reduce_scatter_tensor(out, torch.ones(6))
        full = torch.empty(6)
        dist.all_gather_into_tensor(full, torch.ones(3))
        dist.broadcast(a, src=0)
    dist.all_reduce(a)  # not counted: the wrappers are gone
    return c.calls, c.bytes


@pytest.mark.timeout(120)
def test_comm_counter_uses_ring_convention():
    calls, nbytes = run_ranks(_count_rank, 2, timeout_s=100)[0]
    assert calls == {"all_reduce": 1, "reduce_scatter": 1, "all_gather": 1, "broadcast": 1}
    # 24-byte tensors, world 2: all-reduce 2·(1/2)·24, the others (1/2)·24
    assert nbytes == {"all_reduce": 24, "reduce_scatter": 12, "all_gather": 12, "broadcast": 12}


def test_unknown_config_is_a_clear_error():
    with pytest.raises(SystemExit, match="--only: unknown config.*nope"):
        step.run_cli(["--quick", "--only", "nope"])
