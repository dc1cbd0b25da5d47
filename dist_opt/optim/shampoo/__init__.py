"""Distributed Shampoo: blocked Kronecker-factored preconditioning with grafting, blocks owned by ranks."""

from __future__ import annotations

from typing import Any, cast

from dist_opt.optim.registry import build_rule
from dist_opt.optim.shampoo.rule import Shampoo

__all__ = ["Shampoo", "build_shampoo"]


def build_shampoo(**hp: Any) -> Shampoo:
    """A Shampoo rule from optimizer.* config keys (None or absent: the declared default)."""
    return cast(Shampoo, build_rule("shampoo", **hp))
