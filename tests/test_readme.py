"""The README stays true: its config reference matches the schema, its commands exist, and its
Python example runs under torchrun on 2 ranks."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dist_opt.config.reference import readme_section, render

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_config_reference_is_current():
    assert readme_section(README) == render(), "run: python -m dist_opt.config.reference --write"


def test_ci_runs_the_readme_test_command():
    assert "bash scripts/test.sh" in README and "bash scripts/run.sh" in README
    assert "exec bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.timeout(120)
def test_python_example_runs_on_two_ranks(tmp_path):
    block = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "ShardedOptimizer(" in b)
    code = block.replace("range(1000)", "range(5)").replace('"opt.pt"', repr(str(tmp_path / "opt.pt")))
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)],
        capture_output=True,
        text=True,
        timeout=110,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "opt.pt").exists()
