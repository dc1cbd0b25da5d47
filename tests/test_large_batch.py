"""Large-batch study (bench/large_batch*.py): the critical-batch fit and curve helpers against known
answers, the in-process B_simple measurement against per-sample gradients, and the whole sweep on a
tiny budget (real runs, real 2-rank CLI point) producing a well-formed report and plot."""

from __future__ import annotations

import json
import math
import random
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for the bench package

from bench.large_batch import main as sweep_main  # noqa: E402
from bench.large_batch_analysis import summarize
from bench.large_batch_fit import (
    best_factor,
    edge_extension,
    eval_due,
    first_crossing,
    fit_critical_batch,
    grid_factors,
    local_slopes,
    regime,
    scaling_efficiency,
    seed_stats,
)
from bench.large_batch_report import NOTES_MARKER, plot
from bench.large_batch_run import FixedEval, RunResult, RunSpec, measure_b_simple

BATCHES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


# -- the fit and curve helpers --------------------------------------------------------------------
@pytest.mark.parametrize("s_min,b_crit", [(30.0, 400.0), (120.0, 64.0), (8.0, 2000.0), (50.0, 1000.0)])
def test_fit_recovers_known_s_min_and_b_crit_exactly(s_min, b_crit):
    steps = [s_min * (1 + b_crit / b) for b in BATCHES]
    fit = fit_critical_batch(BATCHES, steps)
    assert fit.s_min == pytest.approx(s_min, rel=1e-5)
    assert fit.b_crit == pytest.approx(b_crit, rel=1e-5)
    assert fit.rms_log < 1e-6 and fit.at_bound == "" and fit.n == len(BATCHES)
    assert fit.e_min == pytest.approx(s_min * b_crit, rel=1e-5)
    assert fit.steps(100.0) == pytest.approx(s_min * (1 + b_crit / 100), rel=1e-5)


def test_fit_recovers_known_values_from_noisy_curves():
    rng = random.Random(0)
    for _ in range(20):
        s_min = math.exp(rng.uniform(math.log(5), math.log(200)))
        b_crit = math.exp(rng.uniform(math.log(100), math.log(1000)))
        steps = [s_min * (1 + b_crit / b) * math.exp(rng.gauss(0, 0.05)) for b in BATCHES]
        fit = fit_critical_batch(BATCHES, steps)
        assert fit.s_min == pytest.approx(s_min, rel=0.2)
        assert fit.b_crit == pytest.approx(b_crit, rel=0.3)
        assert 0.01 < fit.rms_log < 0.15


def test_fit_flags_curves_without_a_knee():
    perfect = fit_critical_batch(BATCHES, [1e5 / b for b in BATCHES])
    assert perfect.at_bound == "upper" and perfect.b_crit > 100 * BATCHES[-1]
    flat = fit_critical_batch(BATCHES, [40.0] * len(BATCHES))
    assert flat.at_bound == "lower" and flat.s_min == pytest.approx(40.0, rel=1e-3)
    with pytest.raises(ValueError, match="at least 2"):
        fit_critical_batch([32, 64], [10.0, math.inf])


def test_slopes_regimes_and_efficiency():
    perfect = [1e4 / b for b in BATCHES]
    assert all(s == pytest.approx(-1.0) for s in local_slopes(BATCHES, perfect))
    assert scaling_efficiency(BATCHES, perfect) == pytest.approx(1.0)
    flat = [50.0] * len(BATCHES)
    assert scaling_efficiency(BATCHES, flat) == pytest.approx(1 / 16)
    # S_min (1 + B_crit/B): efficiency at 16 B0 is (1 + Bc/B0) / (1 + Bc/(16 B0)) / 16
    curve = [10 * (1 + 256 / b) for b in BATCHES]
    assert scaling_efficiency(BATCHES, curve) == pytest.approx((1 + 8) / (1 + 0.5) / 16)
    # 16 x 32 = 512 missing: interpolated log-log between 256 and 1024
    sparse = [32, 256, 1024]
    s = [1e4 / 32, 1e4 / 256, 1e4 / 1024]
    assert scaling_efficiency(sparse, s) == pytest.approx(1.0)
    assert scaling_efficiency([32, 64], [100.0, 50.0]) is None  # 512 outside the measured range
    assert local_slopes([32, 64, 128], [100.0, math.inf, 30.0]) == [None, None]
    assert [regime(x) for x in (-1.0, -0.8, -0.5, -0.2, 0.1, None)] == [
        "perfect",
        "perfect",
        "diminishing",
        "plateau",
        "plateau",
        "-",
    ]


def test_seed_stats_grid_and_extension():
    st = seed_stats([30, None, 10])
    assert (st.median, st.low, st.high, st.reached, st.total) == (30.0, 10.0, math.inf, 2, 3)
    assert not seed_stats([None, None, 5]).ok and seed_stats([4, 6]).median == 5.0
    assert grid_factors(5, 2.0) == [0.25, 0.5, 1.0, 2.0, 4.0] and grid_factors(1, 3.0) == [1.0]
    by = {0.5: seed_stats([50]), 1.0: seed_stats([40]), 2.0: seed_stats([45])}
    assert best_factor(by) == 1.0 and edge_extension(by, 2.0) is None
    by[2.0] = seed_stats([20])
    assert best_factor(by) == 2.0 and edge_extension(by, 2.0) == 4.0
    by = {1.0: seed_stats([None]), 2.0: seed_stats([None])}
    assert best_factor(by) is None and edge_extension(by, 2.0) == 0.5
    assert first_crossing([1, 2, 5], [0.9, 0.4, 0.1], 0.5) == 2 and first_crossing([1], [0.9], 0.5) is None


def test_eval_schedule_resolution_is_one_percent():
    due = [s for s in range(1, 50_001) if eval_due(s)]
    assert due[:100] == list(range(1, 101))
    for a, b in zip(due, due[1:], strict=False):
        assert b - a <= max(1, math.ceil(0.01 * b))


# -- B_simple in-process vs per-sample gradients --------------------------------------------------
@pytest.fixture
def world_one():
    from dist_opt.dist.env import detect
    from dist_opt.dist.group import destroy_process_group, init_process_group

    init_process_group(detect({}), "gloo", 60)
    yield
    destroy_process_group()


def test_measured_b_simple_matches_per_sample_gradient_statistics(world_one, tmp_path):
    from torch.func import functional_call, grad, vmap

    from dist_opt.config import load_config
    from dist_opt.train import Trainer

    cfg = load_config(
        None,
        [
            "task.name=synthetic",
            "task.kind=regression",
            "task.condition_number=10",
            "task.noise=0.5",
            "task.dim=8",
            "data.global_batch=32",
            "data.micro_batch=32",
            "train.steps=10",
            "train.progress=false",
            "tracking.wandb.mode=disabled",
            f"run.out_dir={tmp_path}",
        ],
    )
    tr = Trainer(cfg, torch.device("cpu"))
    b_small, b_big, draws = 32, 512, 16
    b, trace, g2 = measure_b_simple(tr, b_small, b_big, draws)
    # reference: exact per-sample gradients of the same samples (the same index range, in one batch)
    idx = torch.arange(draws * b_big, dtype=torch.long) + 2**40
    x, y = tr.task.train_batch(idx)
    params = {k: v.detach() for k, v in tr.model.named_parameters()}

    def loss_one(p, xi, yi):  # the regression task's loss: squared error (documented in synthetic.py)
        return (functional_call(tr.model, p, (xi[None],)) - yi[None]).square().mean()

    per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([v.reshape(len(idx), -1) for v in per.values()], dim=1).double()
    mean = flat.mean(0)
    ref_trace = float((flat - mean).square().sum(1).mean()) * len(idx) / (len(idx) - 1)
    ref_g2 = float(mean.square().sum()) - ref_trace / len(idx)
    assert trace == pytest.approx(ref_trace, rel=0.1)
    assert g2 == pytest.approx(ref_g2, rel=0.1)
    assert b == pytest.approx(ref_trace / ref_g2, rel=0.15)


def test_fixed_eval_equals_trainer_evaluate(world_one, tmp_path):
    from dist_opt.config import load_config
    from dist_opt.train import Trainer

    cfg = load_config(
        None,
        [
            "task.name=synthetic",
            "task.eval_size=3000",
            "train.eval_max_samples=2500",
            "data.global_batch=16",
            "data.micro_batch=16",
            "train.steps=5",
            "train.progress=false",
            "tracking.wandb.mode=disabled",
            f"run.out_dir={tmp_path}",
        ],
    )
    tr = Trainer(cfg, torch.device("cpu"))
    ev = FixedEval(tr.task, 2500, chunk=1000)
    for _ in range(3):
        assert ev(tr.model) == pytest.approx(tr.evaluate()["eval/loss"], rel=1e-6)
        tr.train_step()


# -- the sweep on a tiny budget --------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_tiny_sweep_writes_well_formed_report_and_plot(tmp_path):
    out = tmp_path / "lb.md"
    work = tmp_path / "work"
    out.write_text(f"old\n{NOTES_MARKER}\nhand-written note\n", encoding="utf-8")
    argv = (
        "--optimizers sgd,adamw --batches 32,128 --seeds 1 --grid-points 3 --max-extend 1 --window 1 "
        "--max-steps 600 --target 0.4 --noise-batches 64,512,2 --multirank-batches 128 "
        "--multirank-optimizers adamw --budget-minutes 5"
    ).split() + ["--out", str(out), "--work-dir", str(work)]
    assert sweep_main(argv) == 0
    text = out.read_text(encoding="utf-8")
    assert "python -m bench.large_batch " + " ".join(argv) in text
    assert text.rstrip().endswith("hand-written note") and "old\n" not in text

    # the raw runs, independently: best over the lr grid of steps-to-target (1 seed)
    runs = [RunResult.from_json(json.loads(x)) for x in (work / "runs.jsonl").read_text().splitlines()]
    assert {(r.spec.optimizer, r.spec.batch) for r in runs} == {
        (o, b) for o in ("sgd", "adamw") for b in (32, 128)
    }
    for r in runs:
        assert r.status in ("reached", "diverged", "stalled", "budget")
        if r.status == "reached":
            assert r.steps == first_crossing([s for s, _ in r.curve], [v for _, v in r.curve], 0.4)
    best = {}
    for r in runs:
        if r.steps is not None:
            key = (r.spec.optimizer, r.spec.batch)
            best[key] = min(best.get(key, math.inf), r.steps)
    assert len(best) == 4, "every (optimizer, batch) should reach the easy target"

    # tables: one summary row per optimizer, one row per (optimizer, batch) with the best steps
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    summary = [
        line for line in rows if re.match(r"\| (sgd|adamw) \| [0-9.]+ \| ", line) and "(B=128)" in line
    ]
    assert len(summary) == 2
    for line in summary:  # the stable-lr window at B=128: best x2^k, |k| <= 1, so k/3 lrs reach the target
        assert re.search(r"\| [0-3]/3 ", line)
    per_batch = {}
    for line in rows:
        m = re.match(r"\| (sgd|adamw) \| (32|128) \| [0-9.e-]+ \(×[0-9.]+\) \| ([0-9.]+) \[", line)
        if m:
            per_batch[(m.group(1), int(m.group(2)))] = float(m.group(3))
    assert per_batch == {k: float(v) for k, v in best.items()}
    cli_rows = [line for line in rows if "| 2 × 64 |" in line]
    assert len(cli_rows) == 1 and cli_rows[0].startswith("| adamw | 128 |")
    assert " ✓ |" in cli_rows[0] and "| 0 |" in cli_rows[0]  # exit 0; 2 ranks reproduced the in-process steps

    # the figure: one data line per optimizer through the medians, a fit line each, the slope -1 line
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = plot(summarize(runs, grid_factors(3, 2.0)), 0.4)
    ax_steps, ax_examples = fig.axes
    lines = {ln.get_label(): ln for ln in ax_steps.get_lines()}
    assert set(lines) == {"sgd", "adamw", "sgd fit", "adamw fit", "perfect scaling"}
    for opt in ("sgd", "adamw"):
        assert list(lines[opt].get_xdata()) == [32, 128]
        assert list(lines[opt].get_ydata()) == [best[(opt, 32)], best[(opt, 128)]]
        ex = {ln.get_label(): ln for ln in ax_examples.get_lines()}[opt]
        assert list(ex.get_ydata()) == [best[(opt, 32)] * 32, best[(opt, 128)] * 128]
    perfect = lines["perfect scaling"]
    assert perfect.get_ydata()[0] / perfect.get_ydata()[-1] == pytest.approx(128 / 32)
    assert ax_steps.get_xscale() == "log" and ax_steps.get_yscale() == "log"

    # --reuse: nothing is re-run, the same per-batch table comes back
    cached = (work / "runs.jsonl").read_text()
    reuse = [*argv[: argv.index("--multirank-batches")], "--multirank-batches", "none", "--reuse"]
    assert sweep_main([*reuse, *argv[argv.index("--budget-minutes") :]]) == 0
    assert (work / "runs.jsonl").read_text() == cached
    batch_row = re.compile(r"\| (sgd|adamw) \| (32|128) \| [0-9.e-]+ \(×")
    again = [line for line in out.read_text(encoding="utf-8").splitlines() if batch_row.match(line)]
    assert len(again) == 4 and again == [line for line in rows if batch_row.match(line)]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--batches", "32,x"], "--batches"),
        (["--optimizers", "adamw,nosuch"], "nosuch"),
        (["--task-override", "data.global_batch=3"], "--task-override"),
        (["--noise-batches", "64,100,2"], "--noise-batches"),
        (["--multirank-batches", "999", "--batches", "32,64"], "--multirank-batches"),
        (["--task-override", "task.kind=bogus"], "task.kind"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(argv, needle, capsys, tmp_path):
    try:
        code = sweep_main([*argv, "--out", str(tmp_path / "x.md"), "--work-dir", str(tmp_path / "w")])
    except SystemExit as e:  # argparse's own type errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err and not (tmp_path / "x.md").exists()


def test_run_spec_round_trips_through_json():
    spec = RunSpec("synthetic", "adamw", 64, 0.01, "sqrt", 32, 1, 0.3, 100, overrides=("task.dim=4",))
    assert spec.lr == pytest.approx(0.01 * math.sqrt(2))
    r = RunResult(spec, "reached", 12, 12, 1.0, 0.29, 0.1, b_simple=3.0, curve=[(0, 1.0), (12, 0.29)])
    assert RunResult.from_json(json.loads(json.dumps(r.to_json()))) == r


# -- the network presets (--preset lm / cnn) ------------------------------------------------------
def test_network_presets_resolve_to_probed_runs():
    from bench.large_batch import make_plan, parse_args

    lm = make_plan(parse_args(["--preset", "lm", "--batches", "16,512"]))
    assert lm.task == "stdlib_lm" and lm.metric == "loss" and list(lm.optimizers) == ["adamw", "lamb"]
    assert lm.optimizers["lamb"]["scale_rule"] == "sqrt" and lm.seeds == 2
    big = lm.spec("adamw", 512, 1.0, 0)
    assert (
        big.warmup_steps == round(2 * math.sqrt(512 / 16)) and lm.spec("adamw", 16, 1.0, 0).warmup_steps == 2
    )
    assert big.micro_batch <= 512 // 2 and lm.spec("adamw", 16, 1.0, 0).micro_batch == 8  # >= 2 micro-steps
    over = big.config_overrides("unused", big.micro_batch)
    assert "tracking.noise_scale=true" in over and "tracking.noise_scale_micro=true" in over
    cnn = make_plan(parse_args(["--preset", "cnn", "--seeds", "3", "--batches", "16,512"]))
    assert cnn.task == "bench.large_batch_cnn:make_task" and cnn.metric == "error" and cnn.seeds == 3
    assert cnn.optimizers["lars"]["scale_rule"] == "linear" and cnn.spec("lars", 16, 1.0, 0).metric == "error"
    quad = make_plan(parse_args([]))  # the default stays the noisy quadratic, without the probe
    assert quad.task == "synthetic" and not quad.probe and quad.spec("sgd", 32, 1.0, 0).metric == "loss"


def test_cnn_point_logs_error_and_online_b_simple(world_one):
    import dataclasses

    from bench.large_batch import make_plan, parse_args
    from bench.large_batch_run import run_point

    plan = make_plan(parse_args(["--preset", "cnn", "--batches", "16,32"]))
    spec = dataclasses.replace(plan.spec("momentum", 32, 1.0, 0), max_steps=3, target=0.0)
    r = run_point(spec)
    assert r.status == "budget" and r.steps_run == 3 and spec.micro_batch == 16
    assert all(0.0 <= v <= 1.0 for _, v in r.curve)  # held-out error, not loss
    assert [s for s, _ in r.b_simple_online] == [1, 2, 3]
    assert all(math.isfinite(v) for _, v in r.b_simple_online)


def test_planner_rows_use_relative_steps_from_the_smallest_batch():
    from bench.large_batch_network import planner_rows

    def run(batch, steps, b_simple):
        spec = RunSpec(
            task="t", optimizer="adamw", batch=batch, base_lr=1.0, scale_rule="sqrt", reference_batch=16,
            seed=0, target=1.0, max_steps=1000, noise_batches=None,
        )  # fmt: skip
        return RunResult(spec, "reached", steps, steps, 5.0, 1.0, 0.0, b_simple=b_simple)

    (s,) = summarize([run(16, 100, 32.0), run(64, 40, 50.0)], [1.0])
    rows = planner_rows(s)
    # S(64) = 100 * (1 + 32/64) / (1 + 32/16) = 50 predicted vs 40 measured
    assert [r[1] for r in rows] == [16, 64] and rows[1][3] == "50" and rows[1][5] == "1.25"
