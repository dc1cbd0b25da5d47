"""Optimizer names -> update rules, with the papers' / torch.optim's defaults.

Defaults never come from the source text's pseudo-code (SPEC §9): Adam betas (0.9, 0.999),
eps 1e-8, bias correction on; LAMB eps 1e-6 with v from g²; LARS with a global lr.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from dist_opt.optim.base import Rule
from dist_opt.optim.elementwise import SGD, Adagrad, Adam, RMSProp
from dist_opt.optim.trust import LAMB, LARS

NAMES = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "lars", "lamb", "shampoo")


def build_rule(name: str, **hp: Any) -> Rule:
    """A rule by name. ``hp`` uses the optimizer.* config keys; None means the default."""

    def get(key: str, default: Any) -> Any:
        v = hp.get(key)
        return default if v is None else v

    if name == "sgd":
        return SGD(momentum=0.0)
    if name in ("momentum", "nesterov"):
        return SGD(momentum=get("momentum", 0.9), dampening=get("dampening", 0.0), nesterov=name == "nesterov")
    if name == "adagrad":
        return Adagrad(eps=get("eps", 1e-10), lr_decay=get("lr_decay", 0.0),
                       initial_accumulator_value=get("initial_accumulator_value", 0.0))
    if name == "rmsprop":
        return RMSProp(alpha=get("alpha", 0.99), eps=get("eps", 1e-8), momentum=get("momentum", 0.0),
                       centered=get("centered", False))
    if name in ("adam", "adamw"):
        return Adam(betas=tuple(get("betas", (0.9, 0.999))), eps=get("eps", 1e-8), decoupled=name == "adamw",
                     amsgrad=get("amsgrad", False), bias_correction=get("bias_correction", True))
    if name == "lars":
        return LARS(momentum=get("momentum", 0.9), trust_coefficient=get("trust_coefficient", 0.001),
                    denominator=get("lars_denominator", "paper"))
    if name == "lamb":
        clip = hp.get("trust_clip")
        return LAMB(betas=tuple(get("betas", (0.9, 0.999))), eps=get("eps", 1e-6),
                    bias_correction=get("bias_correction", True), trust_clip=tuple(clip) if clip else None)
    if name == "shampoo":
        from dist_opt.optim.shampoo import build_shampoo  # noqa: PLC0415 (optional heavy module)

        return build_shampoo(**hp)
    raise ValueError(f"optimizer.name: unknown optimizer {name!r} (expected one of {', '.join(NAMES)})")


@dataclass(frozen=True)
class GroupKey:
    weight_decay: float
    trust: bool
    lr_mult: float


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """A pattern matches a whole dotted component (``bias``, ``ln_f``...) or, as a regex, the name."""
    parts = name.split(".")
    for pat in patterns:
        if any(part == pat or part.startswith(pat + "_") or part.startswith(pat) and part[len(pat):].isdigit()
               for part in parts):
            return True
        try:
            if re.fullmatch(pat, name):
                return True
        except re.error:
            continue
    return False


def group_key(name: str, p: nn.Parameter, *, weight_decay: float, exclude_wd: Iterable[str],
              exclude_trust: Iterable[str], lr_multipliers: dict[str, float], trust_rule: bool,
              exclude_1d: bool = True) -> GroupKey:
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
