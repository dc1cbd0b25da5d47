"""``dist-opt report``: runs written by the real Tracker, checked through matplotlib's objects."""

from __future__ import annotations

import math

import pytest

from dist_opt.config.schema import Config
from dist_opt.report import main, make_figure
from dist_opt.tracking import Tracker


def _write_run(run_dir, steps: int, batch: int, lr: float) -> dict[str, list]:
    """A run's metrics through the Tracker (W&B off); returns the expected finite series."""
    tr = Tracker(Config(run={"out_dir": str(run_dir)}), run_dir, rank=0)
    exp: dict[str, list] = {"step": [], "loss": [], "samples": [], "eval_step": [], "eval/loss": []}
    for s in range(steps):
        loss = math.nan if s == 3 else 3.0 * math.exp(-lr * s)  # step 3: a skipped (non-finite) step
        tr.log({"loss": loss, "lr": lr, "samples": (s + 1) * batch}, step=s)
        if not math.isnan(loss):
            exp["step"].append(s)
            exp["loss"].append(loss)
            exp["samples"].append((s + 1) * batch)
        if s % 5 == 4:
            tr.log({"eval/loss": loss + 0.25}, step=s)
            exp["eval_step"].append(s)
            exp["eval/loss"].append(loss + 0.25)
    tr.summary({"final/loss": loss})
    tr.close()
    return exp


@pytest.fixture
def two_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    a, b = tmp_path / "bs64", tmp_path / "bs256"
    return [a, b], [_write_run(a, 20, 64, 0.1), _write_run(b, 12, 256, 0.3)]


def test_make_figure_one_line_per_run_with_the_data(two_runs):
    dirs, exp = two_runs
    fig = make_figure(dirs, "loss", "step")
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert len(lines) == 2
    assert [ln.get_label() for ln in lines] == ["bs64", "bs256"]
    for ln, e in zip(lines, exp, strict=True):
        assert list(ln.get_xdata()) == e["step"] and list(ln.get_ydata()) == e["loss"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["bs64", "bs256"]
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss"


def test_make_figure_several_metrics_and_samples_axis(two_runs):
    dirs, exp = two_runs
    fig = make_figure(dirs, ["loss", "eval/loss"], "samples")
    assert len(fig.axes) == 2
    loss_ax, eval_ax = fig.axes
    for ln, e in zip(loss_ax.get_lines(), exp, strict=True):
        assert list(ln.get_xdata()) == e["samples"] and list(ln.get_ydata()) == e["loss"]
    for ln, e, batch in zip(eval_ax.get_lines(), exp, (64, 256), strict=True):
        # eval lines carry no "samples" of their own: placed at the samples of their step's train line
        assert list(ln.get_xdata()) == [(s + 1) * batch for s in e["eval_step"]]
        assert list(ln.get_ydata()) == e["eval/loss"]
    fig = make_figure(dirs, "eval/loss", "step")
    for ln, e in zip(fig.axes[0].get_lines(), exp, strict=True):
        assert list(ln.get_xdata()) == e["eval_step"] and list(ln.get_ydata()) == e["eval/loss"]


def test_main_writes_png_and_markdown(two_runs, tmp_path, capsys):
    dirs, exp = two_runs
    out, md = tmp_path / "plots" / "report.png", tmp_path / "summary.md"
    rc = main(
        [str(d) for d in dirs]
        + ["--out", str(out), "--metric", "loss", "--metric", "lr", "--markdown", str(md)]
    )
    assert rc == 0, capsys.readouterr().err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = md.read_text().splitlines()
    assert table[0] == "| run | last step | loss last | loss min | lr last | lr min |"
    assert table[2] == f"| bs64 | 19 | {exp[0]['loss'][-1]:.6g} | {min(exp[0]['loss']):.6g} | 0.1 | 0.1 |"
    assert table[3].startswith("| bs256 | 11 |")


def test_main_bad_input_exit_2(two_runs, tmp_path, capsys):
    dirs, _ = two_runs
    missing = tmp_path / "nope"
    assert main([str(dirs[0]), str(missing), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "not a directory" in err and len(err.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--out", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert main([str(dirs[0]), "--out", str(tmp_path / "x.png"), "--metric", "acc"]) == 2
    assert "no run has metric 'acc'" in capsys.readouterr().err
    assert main([str(dirs[0])]) == 2  # --out is required (argparse usage error)
    assert not (tmp_path / "x.png").exists()
