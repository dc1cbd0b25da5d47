"""Tasks by import path: ``task.name: module:attribute`` (a Task subclass or a callable returning a
Task) with ``task.options``; one-line config errors before any rank starts; a module in the
current directory works in the checking process and in every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dist_opt.config import ConfigError, load_config
from dist_opt.config.loader import validate
from dist_opt.config.schema import BUILTIN_TASKS, TaskConfig
from dist_opt.tasks import TASKS, TaskNameError, build_task, check_task, resolve_task
from dist_opt.tasks.digits import DigitsTask

ROOT = Path(__file__).resolve().parents[1]

MODULE = """
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dist_opt.tasks import Task
from dist_opt.tasks.dataset import DatasetTask


def _split(n):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n + 64, 4, generator=g)
    y = (x @ torch.randn(4, 3, generator=g)).argmax(dim=1)
    return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])


class ClassTask(DatasetTask):
    def __init__(self, cfg, seed):
        super().__init__(lambda: nn.Linear(4, 3), *_split(cfg.options.get("samples", 64)), seed=seed)
        self.options, self.got_seed = dict(cfg.options), seed


def build(cfg, seed):
    return ClassTask(cfg, seed)


def build_cfg_only(cfg):
    return ClassTask(cfg, -1)


def build_nothing():
    return DatasetTask(lambda: nn.Linear(4, 3), _split(32)[0])


class Holder:
    @staticmethod
    def build(cfg, seed):
        return ClassTask(cfg, seed)


def needs_three(cfg, seed, extra):
    return ClassTask(cfg, seed)


def not_a_task(cfg, seed):
    return 42


class NotATask:
    pass


class Abstract(Task):
    pass


NUMBER = 3
"""


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """tmp_path as the working directory, holding ``mytasks.py`` and ``broken_tasks.py``, and NOT on
    sys.path (as for the ``dist-opt`` console script, whose sys.path[0] is its bin directory)."""
    (tmp_path / "mytasks.py").write_text(MODULE)
    (tmp_path / "broken_tasks.py").write_text("x = 1 / 0\n")
    monkeypatch.chdir(tmp_path)
    cwd = os.getcwd()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", cwd, str(tmp_path))])
    for name in ("mytasks", "broken_tasks"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield tmp_path
    for name in ("mytasks", "broken_tasks"):
        sys.modules.pop(name, None)


def cfg(name: str, **options) -> TaskConfig:
    return TaskConfig(name=name, options=options)


def test_builtin_names_match_the_schema_and_resolve_to_their_classes():
    assert tuple(TASKS) == BUILTIN_TASKS
    assert resolve_task("digits") is DigitsTask
    assert check_task(TaskConfig(name="stdlib_lm")) == []


def test_a_task_subclass_is_built_with_config_and_seed_and_sees_the_options(user_dir):
    task = build_task(cfg("mytasks:ClassTask", samples=80, note="hi"), 7)
    assert type(task).__name__ == "ClassTask" and task.train_size == 80 and task.eval_size == 64
    assert task.options == {"samples": 80, "note": "hi"} and task.got_seed == 7
    assert str(user_dir) in sys.path  # the working directory was put on sys.path, as python -m does


@pytest.mark.parametrize(
    "name, seed_seen",
    [
        ("mytasks:build", 5),
        ("mytasks:build_cfg_only", -1),
        ("mytasks:Holder.build", 5),
        ("mytasks:build_nothing", None),
    ],
)
def test_a_callable_may_take_config_and_seed_or_fewer_arguments(user_dir, name, seed_seen):
    task = build_task(cfg(name), 5)
    assert task.train_size in (32, 64)
    assert getattr(task, "got_seed", None) == seed_seen


@pytest.mark.parametrize(
    "name, message",
    [
        ("nope_mod:Task", "task.name: cannot import 'nope_mod:Task': No module named 'nope_mod'"),
        (
            "mytasks:Missing",
            "task.name: cannot import 'mytasks:Missing': module 'mytasks' has no attribute 'Missing'",
        ),
        ("broken_tasks:X", "task.name: cannot import 'broken_tasks:X': ZeroDivisionError: division by zero"),
        (
            "mytasks:NotATask",
            "task.name: 'mytasks:NotATask' is not a Task subclass or a callable returning one",
        ),
        (
            "mytasks:NUMBER",
            "task.name: 'mytasks:NUMBER' is not a Task subclass or a callable returning one (it is a int)",
        ),
        (
            "mytasks:Abstract",
            "task.name: 'mytasks:Abstract' is an abstract Task (it does not implement build_model, ",
        ),
    ],
)
def test_unusable_import_paths_are_one_line_config_errors(user_dir, name, message):
    with pytest.raises(TaskNameError) as e:
        resolve_task(name)
    assert isinstance(e.value, ConfigError) and isinstance(e.value, ValueError)
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(message)
    assert check_task(cfg(name)) == e.value.problems


def test_what_a_callable_returns_and_accepts_is_checked_when_building(user_dir):
    with pytest.raises(
        TaskNameError, match=r"^config error: task.name: 'mytasks:not_a_task' returned a int, not a Task$"
    ):
        build_task(cfg("mytasks:not_a_task"), 0)
    with pytest.raises(
        TaskNameError, match=r"'mytasks:needs_three' must accept \(task_config, seed\), \(task_config\)"
    ):
        build_task(cfg("mytasks:needs_three"), 0)


@pytest.mark.parametrize("name", ["digits", "pkg.mod:Cls", "mod:build", "a.b.c:Outer.inner", "_m:_f"])
def test_task_name_accepts_builtins_and_import_paths(name):
    assert TaskConfig(name=name).name == name


@pytest.mark.parametrize(
    "name", ["mnist", "mod:", ":build", "a b:c", "1mod:x", "mod:x:y", "mod.:x", "my-mod:X"]
)
def test_task_name_rejects_anything_else_in_one_line(name):
    with pytest.raises(ConfigError) as e:
        validate({"task": {"name": name}})
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith(
        "task.name: Input should be a built-in task (stdlib_lm, digits, synthetic) "
        "or an import path 'package.module:attribute'"
    )


def test_task_options_is_a_free_mapping_set_by_yaml_or_override():
    assert TaskConfig().options == {}
    c = load_config(None, ["task.name=mod:build", "task.options.layers=[4, 8]", "task.options.path=data/x"])
    assert c.task.options == {"layers": [4, 8], "path": "data/x"}


# -- end to end through the command line -----------------------------------------------------------
def write_config(tmp_path: Path, name: str, out: str, **extra) -> Path:
    tree = {
        "run": {"out_dir": out, "seed": 0},
        "task": {"name": name, "options": {"samples": 256}},
        "data": {"global_batch": 32, "micro_batch": 16},
        "train": {"steps": 24, "progress": False, "eval_every": 8},
        "optimizer": {"name": "adamw", "lr": 0.05},
        "distributed": {"nproc": 1},
        "checkpoint": {"at_end": False},
        "tracking": {"wandb": {"mode": "disabled"}, "noise_scale": False},
    }
    for key, value in extra.items():
        section, _, k = key.partition("__")
        tree[section][k] = value
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def run_cli(tmp_path: Path, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(600)
def test_train_a_task_from_a_module_in_the_working_directory(tmp_path):
    (tmp_path / "mytasks.py").write_text(MODULE)
    one = run_cli(
        tmp_path,
        [sys.executable, "-m", "dist_opt.train", str(write_config(tmp_path, "mytasks:ClassTask", "one"))],
    )
    assert one.returncode == 0, one.stderr[-3000:]
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["eval/accuracy"] > 0.8  # a learnable teacher: it did train

    # two ranks started by `dist-opt train` (the console script's sys.path does not hold the working
    # directory; torchrun's ranks run `python -m dist_opt.train` there): the same model as one rank
    script = Path(sys.executable).with_name("dist-opt")
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "dist_opt.cli"]
    two = run_cli(
        tmp_path,
        [*launcher, "train", str(write_config(tmp_path, "mytasks:build", "two", distributed__nproc=2))],
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "final_params.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "final_params.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


@pytest.mark.timeout(120)
def test_an_unimportable_task_exits_2_with_one_line_before_any_rank_starts(tmp_path):
    bad = write_config(tmp_path, "nope_mod:Task", "bad", distributed__nproc=2)
    proc = run_cli(tmp_path, [sys.executable, "-m", "dist_opt.train", str(bad)])
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "config error: task.name: cannot import 'nope_mod:Task': No module named 'nope_mod'"
    )
    assert not (tmp_path / "bad").exists()
