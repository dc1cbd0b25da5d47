"""Tests that need something from the machine (root, ``ip netns``, a tmpfs) skip without it -- unless
``DIST_OPT_REQUIRE_ALL_TESTS=1`` (set by ``.ci/run``), which turns those skips into failures, so CI
cannot pass while silently leaving out the multi-node or disk-full tests.

Use :func:`require_or_skip` at every such place instead of ``pytest.skip``.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_ALL_VAR = "DIST_OPT_REQUIRE_ALL_TESTS"


def require_all() -> bool:
    """True when missing environment must fail the test instead of skipping it."""
    return os.environ.get(REQUIRE_ALL_VAR, "").strip().lower() in ("1", "true", "yes")


def require_or_skip(reason: str) -> NoReturn:
    """Skip with ``reason``, or fail with it when :func:`require_all` is set."""
    if require_all():
        pytest.fail(f"{reason} ({REQUIRE_ALL_VAR}=1: this test must run here)", pytrace=False)
    pytest.skip(reason)
