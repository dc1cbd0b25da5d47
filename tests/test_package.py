"""The wheel holds the ``dist_opt`` package only: no top-level ``launch`` (the checkout's deprecated
shim), ``bench`` or ``tests``. Built offline from a copy of the source tree, so the checkout gets no
``build/`` or ``*.egg-info``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TOP_NOT_SOURCE = {".git", ".venv", "build", "dist", "runs", "wandb", ".hypothesis"}  # only at the top level
ANYWHERE_NOT_SOURCE = shutil.ignore_patterns("*.egg-info", "__pycache__", ".*_cache")


def _not_source(directory: str, names: list[str]) -> set[str]:
    top = set(names) & TOP_NOT_SOURCE if Path(directory) == REPO else set()
    return top | ANYWHERE_NOT_SOURCE(directory, names)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "dist-opt"
    shutil.copytree(REPO, src, ignore=_not_source)
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [whl] = out.glob("dist_opt-*.whl")
    return whl


@pytest.mark.timeout(660)
def test_wheel_top_level_is_only_dist_opt(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    info = {t for t in top if t.endswith(".dist-info")}
    assert len(info) == 1 and next(iter(info)).startswith("dist_opt-")
    assert top - info == {"dist_opt"}, sorted(top)


@pytest.mark.timeout(660)
def test_wheel_has_the_launcher_and_the_console_script(wheel):
    zf = zipfile.ZipFile(wheel)
    names = set(zf.namelist())
    for module in (
        "dist_opt/launch/__main__.py",
        "dist_opt/launch/remote.py",
        "dist_opt/launch/cli.py",
        "dist_opt/dist/__init__.py",
        "dist_opt/engine/__init__.py",
        "dist_opt/optim/__init__.py",
        "dist_opt/optim/shampoo/__init__.py",
    ):
        assert module in names, module
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "dist-opt = dist_opt.cli:main" in zf.read(entry_points).decode()


@pytest.mark.timeout(660)
def test_fresh_venv_with_the_wheel_inits_and_trains_from_an_empty_directory(wheel, tmp_path):
    """A new virtual environment (dependencies borrowed from this one, dist-opt only from the wheel,
    no editable install, no checkout on the path): `dist-opt init` then `dist-opt train`."""
    import site
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    vsite = Path(
        subprocess.run(
            [str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    deps = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (vsite / "borrowed_deps.pth").write_text("\n".join(deps) + "\n")  # plain paths: no editable finder runs
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--ignore-installed",  # never uninstall the dist-opt of the running environment
            "--prefix",
            str(venv),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    where = subprocess.run(
        [str(vpy), "-c", "import dist_opt; print(dist_opt.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert str(venv) in where.stdout, where.stdout + where.stderr  # the wheel's copy, not the checkout
    cli = [str(vpy), str(venv / "bin" / "dist-opt")]  # the console script, run by the new venv's python
    init = subprocess.run([*cli, "init"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert init.returncode == 0 and (work / "quickstart.yaml").is_file(), init.stderr
    train = subprocess.run(
        [*cli, "train", "quickstart.yaml", "train.steps=3", "train.eval_every=0", "train.progress=false",
         "task.max_files=20", "distributed.nproc=1", "tracking.wandb.mode=disabled"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    assert (work / "runs" / "quickstart" / "summary.json").is_file()
    assert "steps 3" in train.stdout
