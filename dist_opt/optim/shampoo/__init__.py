"""Distributed Shampoo: blocked Kronecker-factored preconditioning with grafting,
blocks owned by ranks. ``build_shampoo(**optimizer_config)`` is what the registry calls."""

from dist_opt.optim.shampoo.rule import Shampoo, build_shampoo

__all__ = ["Shampoo", "build_shampoo"]
