"""The optimizer registry: public names to declare, look up and build optimizers.

Each optimizer is declared once as a :class:`RuleSpec` (built-ins: ``dist_opt.optim.catalog``); the
config schema, the engines' checks, checkpoints and :func:`build_rule` all read the declaration
(see ``dist_opt.optim.spec``). Adding one::

    register_rule(RuleSpec("signsgd", "mypkg.signsgd:SignSGD", hyper={"momentum": 0.0}, elementwise=True))

Also here: which parameter group (weight decay, trust ratio, lr multiplier) a parameter joins.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from dist_opt.optim.base import Rule
from dist_opt.optim.spec import (
    GENERIC_KEYS,
    Key,
    RuleSpec,
    declare_key,
    declared_keys,
    inapplicable,
    register_rule,
    rule_kwargs,
    rule_names,
    rule_spec,
    structural_keys,
    unregister_rule,
)

__all__ = [
    "GENERIC_KEYS",
    "GroupKey",
    "Key",
    "RuleSpec",
    "build_rule",
    "declare_key",
    "declared_keys",
    "group_key",
    "inapplicable",
    "register_rule",
    "rule_kwargs",
    "rule_names",
    "rule_spec",
    "structural_keys",
    "unregister_rule",
]

#: capability of the declaration -> the attribute of the built rule the engines read
_CAPABILITIES = {
    "trust_ratio": "uses_trust_ratio",
    "whole_tensors": "replicated_pieces",
    "decoupled_weight_decay": "decoupled_weight_decay",
}


def __getattr__(name: str) -> Any:
    if name == "NAMES":  # the registered names, read when asked (earlier versions had a fixed tuple)
        return rule_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_rule(name: str, **hp: Any) -> Rule:
    """The rule of optimizer ``name``. ``hp`` are optimizer.* config values; None or absent means the
    declared default. Generic keys (lr, weight_decay, ...) are ignored (the engine applies them); a
    value for a key ``name`` does not read raises ValueError."""
    if name not in rule_names():
        raise ValueError(
            f"optimizer.name: unknown optimizer {name!r} (expected one of {', '.join(rule_names())})"
        )
    spec = rule_spec(name)
    rule = spec.factory()(**rule_kwargs(name, hp))
    if not isinstance(rule, Rule):
        raise TypeError(f"optimizer {name!r}: {spec.rule!r} built a {type(rule).__name__}, not a Rule")
    for cap, attr in _CAPABILITIES.items():
        if bool(getattr(rule, attr)) != getattr(spec, cap):
            raise TypeError(
                f"optimizer {name!r}: declared {cap}={getattr(spec, cap)} but its rule has "
                f"{attr}={getattr(rule, attr)}"
            )
    return rule


@dataclass(frozen=True)
class GroupKey:
    weight_decay: float
    trust: bool
    lr_mult: float


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """A pattern matches a whole dotted component (``bias``, ``ln_f``...) or, as a regex, the name."""
    parts = name.split(".")
    for pat in patterns:
        if any(
            part == pat or part.startswith(pat + "_") or part.startswith(pat) and part[len(pat) :].isdigit()
            for part in parts
        ):
            return True
        try:
            if re.fullmatch(pat, name):
                return True
        except re.error:
            continue
    return False


def group_key(
    name: str,
    p: nn.Parameter,
    *,
    weight_decay: float,
    exclude_wd: Iterable[str],
    exclude_trust: Iterable[str],
    lr_multipliers: dict[str, float],
    trust_rule: bool,
    exclude_1d: bool = True,
) -> GroupKey:
    """Which group a parameter belongs to. 1-D parameters (biases, norm weights) get no trust
    ratio (LARS/LAMB) and, with ``exclude_1d``, no weight decay, as in MLPerf practice; name
    patterns add more."""
    one_d = p.ndim <= 1
    no_wd = (one_d and exclude_1d) or _matches(name, exclude_wd)
    trust = trust_rule and not (one_d or _matches(name, exclude_trust))
    mult = 1.0
    for pat, m in lr_multipliers.items():
        if re.search(pat, name):
            mult = m
            break
    return GroupKey(0.0 if no_wd else weight_decay, trust, mult)
