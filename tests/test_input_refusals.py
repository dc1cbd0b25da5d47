"""Inputs that used to be accepted or crash with a traceback: each is refused with one line naming
the problem, exit code 2, and nothing is written. Secret values never reach the run's files."""

from pathlib import Path

import pytest
import yaml

from dist_opt.config import ConfigError, load_config, to_dict
from dist_opt.tracking.wandb_run import init_kwargs
from dist_opt.train import main as train_main

GOOD = {
    "task": {"name": "synthetic", "dim": 4, "hidden": 8},
    "data": {"global_batch": 8, "micro_batch": 4},
    "train": {"steps": 2, "progress": False},
    "distributed": {"nproc": 1},
    "tracking": {"wandb": {"mode": "disabled"}},
}


def _run(tmp_path: Path, text: str, overrides=()) -> tuple[int, Path]:
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    return train_main([str(cfg), f"run.out_dir={out}", *overrides]), out


def test_duplicate_yaml_key_is_refused_with_both_lines(tmp_path, capsys):
    text = yaml.safe_dump(GOOD) + "train:\n  steps: 5\n"
    code, out = _run(tmp_path, text)
    err = capsys.readouterr().err.strip()
    first = 1 + next(i for i, line in enumerate(text.splitlines()) if line.startswith("train:"))
    assert code == 2 and not out.exists()
    assert err.count("\n") == 0 and "cfg.yaml" in err
    assert f"duplicate key 'train' at line {len(text.splitlines()) - 1} (first given at line {first})" in err


def test_duplicate_nested_key_is_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optimizer:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' at line 3 \(first given at line 2\)"):
        load_config(p)


@pytest.mark.parametrize("text, what", [("", "is empty"), ("# only a comment\n", "holds only comments")])
def test_empty_config_file_is_refused(tmp_path, capsys, text, what):
    code, out = _run(tmp_path, text)
    assert code == 2 and not out.exists()
    assert what in capsys.readouterr().err


def test_out_of_range_seed_is_refused(tmp_path, capsys):
    code, out = _run(tmp_path, yaml.safe_dump(GOOD), ["run.seed=99999999999999999999"])
    assert code == 2 and not out.exists()
    assert "run.seed: Input should be less than or equal to" in capsys.readouterr().err


def test_global_batch_that_cannot_fit_in_memory_is_refused_before_writing(tmp_path, capsys):
    code, out = _run(tmp_path, yaml.safe_dump(GOOD), ["data.global_batch=1125899906842624"])
    assert code == 2 and not out.exists()
    assert "data.global_batch: 1125899906842624 samples per step need" in capsys.readouterr().err


SECRET = "sekrit123value"


def test_secret_env_value_is_redacted_from_config_and_wandb_names(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    tree = dict(
        GOOD,
        tracking={
            "wandb": {"mode": "offline", "name": SECRET, "group": f"g-{SECRET}", "tags": ["ok", SECRET]}
        },
    )
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    cfg = load_config(p)
    assert SECRET not in repr(to_dict(cfg)) and "<redacted>" in repr(to_dict(cfg))
    kw = init_kwargs(cfg.tracking.wandb, tmp_path, "abc123", to_dict(cfg), env={"WANDB_API_KEY": SECRET})
    assert SECRET not in repr(kw)
    assert kw["name"] == "<redacted>" and kw["group"] == "g-<redacted>" and kw["tags"] == ["ok", "<redacted>"]


def test_secret_env_value_never_reaches_run_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_MODE", "offline")
    tree = dict(
        GOOD,
        tracking={"wandb": {"mode": "offline", "name": SECRET, "group": SECRET, "tags": [SECRET]}},
        checkpoint={"at_end": True},
    )
    code, out = _run(tmp_path, yaml.safe_dump(tree))
    assert code == 0
    files = [f for f in out.rglob("*") if f.is_file()]
    assert any(f.suffix == ".wandb" for f in files) and (out / "config.yaml").exists()
    assert any("manifest" in f.name for f in files)
    leaked = [str(f) for f in files if SECRET.encode() in f.read_bytes()]
    assert leaked == []
