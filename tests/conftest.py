import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")

from harness import DistHarness  # noqa: E402


@pytest.fixture(scope="module")
def world2():
    h = DistHarness(2)
    yield h
    h.close()


@pytest.fixture(scope="module")
def world3():
    h = DistHarness(3)
    yield h
    h.close()
