"""The two ways a launch ends badly: bad input (exit 2) or a failed launch (exit 1)."""

from __future__ import annotations


class LaunchError(Exception):
    """Bad input: a hostfile, an option or a config that cannot work. Nothing was started."""

    exit_code = 2


class LaunchFailure(Exception):
    """The launch was attempted and failed (unreachable node, rank died, timeout)."""

    exit_code = 1
