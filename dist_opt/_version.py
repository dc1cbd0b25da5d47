"""The installed version of dist-opt (package metadata; the constant when running from a source tree)."""

from __future__ import annotations

__version__ = "0.1.0"
"""Fallback when no package metadata is found; keep equal to ``[project] version`` in pyproject.toml."""


def version() -> str:
    """dist-opt's version from the installed distribution's metadata, else :data:`__version__`."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("dist-opt")
    except PackageNotFoundError:
        return __version__
