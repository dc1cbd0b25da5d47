"""Starter configs ship with the package and load; ``dist-opt init`` writes them safely;
``dist-opt --version`` prints the version."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path

import pytest

from dist_opt import _version
from dist_opt.cli import main as cli_main
from dist_opt.config import load_config
from dist_opt.init_cli import starter_configs

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["lamb-large-batch", "quickstart", "shampoo", "swa", "user-task"]


def test_the_packaged_quickstart_is_the_repository_quickstart():
    packaged = (ROOT / "dist_opt" / "configs" / "quickstart.yaml").read_bytes()
    assert packaged == (ROOT / "configs" / "quickstart.yaml").read_bytes()
    assert starter_configs()["quickstart"] == packaged.decode("utf-8")


@pytest.mark.parametrize("name", NAMES)
def test_every_starter_config_loads(name, tmp_path):
    path = tmp_path / f"{name}.yaml"
    path.write_text(starter_configs()[name], encoding="utf-8")
    cfg = load_config(path)
    assert cfg.run.out_dir.startswith("runs/")


def test_the_configs_are_package_data():
    assert sorted(starter_configs()) == NAMES
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '[tool.setuptools.package-data]\ndist_opt = ["configs/*.yaml"]' in text


def test_user_task_template_names_a_module_attribute():
    cfg = load_config(ROOT / "dist_opt" / "configs" / "user-task.yaml")
    assert cfg.task.name == "my_module:MyTask" and cfg.task.options


def test_init_writes_the_quickstart_by_default_and_keeps_an_existing_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["init"]) == 0
    target = tmp_path / "quickstart.yaml"
    assert target.read_text(encoding="utf-8") == starter_configs()["quickstart"]
    assert "wrote quickstart.yaml" in capsys.readouterr().out

    target.write_text("mine\n")
    assert cli_main(["init"]) == 2
    err = capsys.readouterr().err
    assert err == "dist-opt init: quickstart.yaml exists (pass --force to overwrite it)\n"
    assert target.read_text() == "mine\n"
    assert cli_main(["init", "quickstart", "--force"]) == 0
    assert target.read_text(encoding="utf-8") == starter_configs()["quickstart"]


def test_init_name_and_out(tmp_path, capsys):
    out = tmp_path / "sub.yaml"
    assert cli_main(["init", "shampoo", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == starter_configs()["shampoo"]
    capsys.readouterr()
    assert cli_main(["init", "swa", "--out", "-"]) == 0
    assert capsys.readouterr().out == starter_configs()["swa"]


def test_init_unknown_name_exits_2_with_one_line_listing_the_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["init", "imagenet"]) == 2
    err = capsys.readouterr().err
    assert err == f"dist-opt init: unknown starter config 'imagenet' (choose from {', '.join(NAMES)})\n"
    assert list(tmp_path.iterdir()) == []
    assert cli_main(["init", "--nope"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_init_list(capsys):
    assert cli_main(["init", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == NAMES
    assert all(len(line.split(None, 1)) == 2 for line in lines)  # each with a description


def test_version(capsys):
    assert cli_main(["--version"]) == 0
    try:
        expected = dist_version("dist-opt")
    except PackageNotFoundError:
        expected = _version.__version__
    assert capsys.readouterr().out == f"dist-opt {expected}\n"
    if sys.version_info >= (3, 11):
        import tomllib

        project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
        assert _version.__version__ == project["version"]


def test_usage_lists_init():
    from dist_opt.cli import USAGE

    assert "init [NAME]" in USAGE and "--version" in USAGE
