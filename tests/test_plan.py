"""dist_opt.plan: α-β formulas against hand-computed cases, the step model, cost-model files, and
``dist-opt plan`` on a real 2-rank quickstart run (one launch for the module)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
from harness import run_ok

from dist_opt.cli import main as cli_main
from dist_opt.noise_scale import relative_steps
from dist_opt.plan import (
    PRESETS,
    CostModel,
    CostModelError,
    Fabric,
    Link,
    Workload,
    collective,
    cost_model_from_dict,
    flat,
    layout,
    load_cost_model,
    ring,
    step_time,
    tree,
)
from dist_opt.plan.planner import Candidate, candidates, recommend
from dist_opt.plan.probe import read_probe

REPO = Path(__file__).resolve().parents[1]
A, B = 1e-5, 1e9  # α = 10 µs, β = 1 GB/s
L = Link(A, B)
N = 1e6  # bytes


# -- collectives --------------------------------------------------------------------------------
def test_ring_all_reduce_is_2_p_minus_1_alpha_plus_2_p_minus_1_over_p_n_over_beta():
    assert ring("all_reduce", N, 4, L) == pytest.approx(2 * 3 * A + 2 * 3 / 4 * N / B)
    assert ring("all_reduce", N, 2, L) == pytest.approx(2 * A + N / B)


def test_ring_reduce_scatter_and_all_gather_are_half_an_all_reduce():
    for op in ("reduce_scatter", "all_gather"):
        assert ring(op, N, 4, L) == pytest.approx(3 * A + 3 / 4 * N / B)


def test_tree_all_reduce_and_recursive_halving_costs():
    assert tree("all_reduce", N, 8, L) == pytest.approx(2 * 3 * A + 2 * N / B)
    assert tree("all_reduce", N, 5, L) == pytest.approx(2 * 3 * A + 2 * N / B)  # ⌈log2 5⌉ = 3
    assert tree("reduce_scatter", N, 8, L) == pytest.approx(3 * A + 7 / 8 * N / B)


def test_auto_takes_the_cheaper_algorithm_and_one_rank_costs_nothing():
    big, small = 1e9, 8.0
    assert flat("all_reduce", big, 64, L) == ring("all_reduce", big, 64, L)  # bandwidth-bound: ring
    assert flat("all_reduce", small, 64, L) == tree("all_reduce", small, 64, L)  # latency-bound: tree
    assert ring("all_reduce", N, 1, L) == tree("all_gather", N, 1, L) == 0.0
    with pytest.raises(ValueError, match="op="):
        ring("broadcast", N, 2, L)


def test_hierarchical_all_reduce_is_intra_rs_inter_ar_on_n_over_g_intra_ag():
    intra, inter = Link(1e-6, 100e9), Link(5e-6, 10e9)
    got = collective("all_reduce", N, 4, 8, intra, inter, "ring")
    want = (7 * 1e-6 + 7 / 8 * N / 100e9) * 2 + (2 * 3 * 5e-6 + 2 * 3 / 4 * (N / 8) / 10e9)
    assert got == pytest.approx(want)
    rs = collective("reduce_scatter", N, 4, 8, intra, inter, "ring")
    assert rs == pytest.approx(7 * 1e-6 + 7 / 8 * N / 100e9 + 3 * 5e-6 + 3 / 4 * (N / 8) / 10e9)
    assert collective("all_reduce", N, 1, 8, intra, inter, "ring") == ring("all_reduce", N, 8, intra)
    assert collective("all_reduce", N, 4, 1, intra, inter, "ring") == ring("all_reduce", N, 4, inter)


def test_inter_node_bandwidth_is_shared_by_the_ranks_of_a_node():
    cm = CostModel(8, PRESETS["nvlink4"], PRESETS["ib_ndr"])
    assert cm.inter_link(8).bandwidth_Bps == pytest.approx(50e9)  # one NDR NIC per GPU
    cm = CostModel(8, PRESETS["nvlink4"], PRESETS["eth100"])
    assert cm.inter_link(8).bandwidth_Bps == pytest.approx(12.5e9 / 8)  # one 100 GbE NIC per node


def test_the_cost_model_and_the_planner_import_no_torch():
    code = "import sys, dist_opt.plan, dist_opt.plan.cli; assert 'torch' not in sys.modules"
    run_ok([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)


# -- step model ---------------------------------------------------------------------------------
def test_step_time_of_ddp_zero1_zero2_by_hand():
    fab = Fabric(B / 1e9, A * 1e6)
    cm = CostModel(4, fab, fab, algorithm="ring")
    w = Workload(params=1000, sample_s=0.01, update_s_per_param=1e-6, grad_bytes=4, param_bytes=2)
    ar = 2 * 3 * A + 2 * 3 / 4 * 4000 / B
    rs, ag = 3 * A + 3 / 4 * 4000 / B, 3 * A + 3 / 4 * 2000 / B
    ddp, z1, z2 = (step_time(m, w, 64, 4, cm) for m in ("ddp", "zero1", "zero2"))
    assert ddp.compute_s == pytest.approx(0.01 * 16)
    assert ddp.total_s == pytest.approx(0.16 + ar + 1e-3)
    assert z1.total_s == pytest.approx(0.16 + ar + ag + 1e-3 / 4)
    assert z2.total_s == pytest.approx(0.16 + rs + ag + 1e-3 / 4)
    assert z2.comm_share == pytest.approx((rs + ag) / z2.total_s)
    half = step_time("ddp", w, 64, 4, CostModel(4, fab, fab, algorithm="ring", overlap=0.5))
    assert half.exposed_comm_s == pytest.approx(ar / 2)


def test_layout_packs_gpus_onto_nodes():
    assert layout(4, 8) == (1, 4)
    assert layout(64, 8) == (8, 8)
    with pytest.raises(ValueError, match="multiple"):
        layout(12, 8)


def test_recommend_is_the_fastest_within_the_cost_limit():
    st = step_time("ddp", Workload(1, 1.0, 0.0), 1, 1, CostModel())
    rows = [Candidate(1, 1, 1, 1, st, rel_time=t, rel_cost=c) for t, c in ((1, 1), (0.5, 1.9), (0.2, 2.5))]
    assert recommend(rows).rel_time == 0.5
    assert recommend(rows, max_cost_ratio=3).rel_time == 0.2


def test_candidates_use_relative_steps_and_skip_fractional_batches():
    w = Workload(params=10**6, sample_s=1e-3, update_s_per_param=1e-9)
    rows = candidates(w, "zero2", 64, 100.0, [8, 64, 256], [8, 64], CostModel())
    assert [(r.batch, r.gpus) for r in rows] == [(8, 8), (64, 8), (256, 8), (64, 64), (256, 64)]
    for r in rows:
        assert r.rel_steps == relative_steps(r.batch, 64, 100.0)
    ref = rows[1]
    assert ref.rel_time == ref.rel_cost == 1.0
    assert rows[3].rel_cost == pytest.approx(rows[3].rel_time * 8)


# -- cost-model files ---------------------------------------------------------------------------
def test_cost_model_file_overrides_presets(tmp_path):
    f = tmp_path / "cm.yaml"
    f.write_text(
        "gpus_per_node: 4\nintra: pcie4\ninter: {preset: eth100, bandwidth_GBps: 10}\noverlap: 0.5\n"
    )
    cm = load_cost_model(f)
    assert (cm.gpus_per_node, cm.intra, cm.overlap) == (4, PRESETS["pcie4"], 0.5)
    assert cm.inter == Fabric(10.0, PRESETS["eth100"].latency_us, nics_per_node=1)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("gpus_per_nodes: 8\n", "gpus_per_nodes"),
        ("overlap: 2\n", "overlap"),
        ("intra: {preset: nvlink9}\n", "intra.preset"),
        ("inter: {bandwidth: 3}\n", "inter.bandwidth"),
        ("gpus_per_node: -1\n", "gpus_per_node"),
        ("algorithm: star\n", "algorithm"),
    ],
)
def test_bad_cost_model_names_the_key_and_the_file(tmp_path, text, key):
    f = tmp_path / "cm.yaml"
    f.write_text(text)
    with pytest.raises(CostModelError) as e:
        load_cost_model(f)
    msg = str(e.value)
    assert str(f) in msg and key in msg and "\n" not in msg


def test_cost_model_dict_rejects_a_non_mapping():
    with pytest.raises(CostModelError):
        cost_model_from_dict([1, 2])


# -- dist-opt plan on a real probe run ------------------------------------------------------------
@pytest.fixture(scope="module")
def probe_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plan") / "qs"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    run_ok(
        [sys.executable, "-m", "dist_opt", "train", str(REPO / "configs/quickstart.yaml"), "train.steps=10",
         "train.eval_every=0", "train.progress=false", "checkpoint.at_end=false", f"run.out_dir={out}"],
        env=env, cwd=out.parent, timeout=200,
    )  # fmt: skip
    return out


@pytest.mark.timeout(240)
def test_plan_prints_the_table_for_a_real_two_rank_run(probe_run, tmp_path, capsys):
    png = tmp_path / "plan.png"
    assert (
        cli_main(["plan", str(probe_run), "--gpus", "8,64", "--batches", "64,128,512", "--plot", str(png)])
        == 0
    )
    out = capsys.readouterr().out
    assert "| batch | GPUs | nodes | batch/GPU | steps × | step ms | comm % | time × | cost × |" in out
    assert "B_noise = " in out and "the last 2 of 10 logged values" in out
    assert "recommended (★)" in out and png.stat().st_size > 0
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 6  # 64, 128 and 512 on 8 GPUs and on 64 GPUs
    pr = read_probe(probe_run)
    cells = rows[0].split("|")
    assert float(cells[5]) == pytest.approx(relative_steps(64, 64, pr.b_noise), abs=1e-3)
    assert pr.world == 2 and pr.global_batch == 64 and math.isfinite(pr.b_noise)


def test_plan_refuses_a_run_without_b_simple(probe_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(probe_run, run, ignore=shutil.ignore_patterns("wandb", "checkpoints"))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "noise/b_simple"}) + "\n" for r in lines)
    )
    assert cli_main(["plan", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "noise/b_simple" in err and ">= 2 ranks" in err


def test_plan_refuses_a_malformed_cost_file_and_a_missing_run_dir(tmp_path, capsys):
    bad = tmp_path / "cm.yaml"
    bad.write_text("inter: {preset: ib_ndr, latency_us: fast}\n")
    assert cli_main(["plan", str(tmp_path), "--cost-model", str(bad)]) == 2  # the file is read first
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(bad) in err and "inter.latency_us" in err
    assert cli_main(["plan", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no such run directory" in err
