"""An optimizer is declared once, as a :class:`RuleSpec`; everything else is derived from it.

A spec names the optimizer, the ``optimizer.*`` config keys its rule reads with their defaults (the
only place a default is written), which of those keys change the shape of the saved state, and
what the rule needs from an engine (its capabilities). Derived from the registered specs:

* the valid ``optimizer.name`` values and the typed ``optimizer.*`` fields of the config schema
  (``dist_opt.config.schema``; a key's default there is the optimizers' common default, or None
  where they differ), and the reference table generated from it;
* the check that every key a config sets applies to its optimizer (:func:`inapplicable`);
* :func:`dist_opt.optim.registry.build_rule` and the keys the engines pass to it
  (:func:`rule_kwargs`);
* the keys a checkpoint must agree on to be resumed (:func:`structural_keys`);
* which engines and ZeRO stages accept the optimizer (``dist_opt.integrations``).

Config keys are declared once too (:func:`declare_key`: name, pydantic type, meaning), so optimizers
that share a key (``eps``, ``betas``...) share its type. A rule's constructor takes its keys as keyword
arguments of the same names, plus the spec's ``fixed`` arguments.

This module and the built-in declarations (``dist_opt.optim.catalog``) import no torch, so configs
can be validated where torch is not installed (the launcher). A spec names its rule class by a
``"module:attribute"`` path, imported when a rule is first built (or gives the class itself).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_EXCLUDE = ("bias", "norm", "bn", "ln")
"""Name patterns excluded from weight decay and trust ratios by default (biases and norm layers)."""

#: keys every optimizer accepts: the engine applies them (lr, weight decay groups, clipping)
GENERIC_KEYS = (
    "lr",
    "weight_decay",
    "max_grad_norm",
    "exclude_from_weight_decay",
    "exclude_from_trust_ratio",
    "lr_multipliers",
)
BUILTINS = "dist_opt.optim.catalog"


@dataclass(frozen=True)
class Key:
    """An ``optimizer.<name>`` config key a rule may read."""

    name: str
    type: Any  # pydantic annotation of a value (None is added where the optimizers' defaults differ)
    doc: str


@dataclass(frozen=True, eq=False)
class RuleSpec:
    """The declaration of one optimizer.

    ``hyper`` maps each config key the rule reads to its default; the rule is built as
    ``rule(**fixed, **{key: value or default})``. Capabilities:

    * ``elementwise``: each element's update depends only on that element (and per-group scalars such
      as lr), so the rule runs on any flat partition of the parameters (DeepSpeed ZeRO-1/2);
    * ``trust_ratio``: per-layer norms (LARS/LAMB): needs to know which piece belongs to which layer;
      parameters matched by ``optimizer.exclude_from_trust_ratio`` get ratio 1 (``Rule.uses_trust_ratio``);
    * ``whole_tensors``: the rule distributes its own work over whole parameters (Shampoo's blocks;
      ``Rule.replicated_pieces``);
    * ``decoupled_weight_decay``: weight decay is AdamW-style rather than L2 on the gradient.

    ``structural`` lists keys whose value changes the shape of the saved state (``name`` always
    does): resuming with another value is refused. ``hints`` adds advice to the error for a key
    that does not apply (e.g. momentum's ``nesterov`` -> ``optimizer.name=nesterov``).
    """

    name: str
    rule: str | Callable[..., Any]  # "package.module:Class" or a callable returning a Rule
    doc: str = ""
    hyper: Mapping[str, Any] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    structural: tuple[str, ...] = ()
    elementwise: bool = False
    trust_ratio: bool = False
    whole_tensors: bool = False
    decoupled_weight_decay: bool = False
    hints: Mapping[str, str] = field(default_factory=dict)

    @property
    def keys(self) -> tuple[str, ...]:
        """The optimizer.* keys this optimizer reads, besides the generic ones."""
        return tuple(self.hyper)

    def factory(self) -> Callable[..., Any]:
        if callable(self.rule):
            return self.rule
        module, _, attr = self.rule.partition(":")
        rule: Callable[..., Any] = getattr(importlib.import_module(module), attr)
        return rule


_KEYS: dict[str, Key] = {}
_RULES: dict[str, RuleSpec] = {}
_LOADING: list[str] = []  # the built-ins are being (or have been) imported


def _builtins() -> None:
    if not _LOADING:
        _LOADING.append(BUILTINS)
        importlib.import_module(BUILTINS)


def declare_key(name: str, type: Any, doc: str) -> Key:  # noqa: A002 (the field's type)
    """Declare an ``optimizer.<name>`` key (declaring the same key again with the same type is a no-op).

    Keys must be declared before ``dist_opt.config.schema`` is imported to become config fields: the
    built-in ones are in ``dist_opt.optim.catalog``."""
    if not name.isidentifier() or name in GENERIC_KEYS or name == "name":
        raise ValueError(f"optimizer key {name!r}: not an identifier, or a generic key")
    old = _KEYS.get(name)
    if old is not None:
        if old.type != type:
            raise ValueError(f"optimizer.{name}: already declared with type {old.type!r}")
        return old
    _KEYS[name] = key = Key(name, type, doc)
    return key


def register_rule(spec: RuleSpec, *, replace: bool = False) -> RuleSpec:
    """Make ``spec.name`` a valid ``optimizer.name``. Returns ``spec``."""
    _builtins()
    problems = []
    if not spec.name.isidentifier() or spec.name != spec.name.lower():
        problems.append("the name must be a lower-case identifier")
    if spec.name in _RULES and not replace:
        problems.append("already registered (pass replace=True to redefine it)")
    problems += [f"optimizer.{k} is not a declared key (declare_key)" for k in spec.hyper if k not in _KEYS]
    problems += [
        f"structural key {k!r} is not one of its keys" for k in spec.structural if k not in spec.hyper
    ]
    problems += [f"hint for {k!r}, which is one of its keys" for k in spec.hints if k in spec.hyper]
    problems += [f"fixed argument {k!r} is also a config key" for k in spec.fixed if k in spec.hyper]
    if spec.elementwise and (spec.trust_ratio or spec.whole_tensors):
        problems.append("an elementwise rule cannot need layer norms or whole tensors")
    if problems:
        raise ValueError(f"optimizer {spec.name!r}: " + "; ".join(problems))
    _RULES[spec.name] = spec
    return spec


def unregister_rule(name: str) -> None:
    """Remove a registered optimizer (for plugins and tests that register temporary ones)."""
    _RULES.pop(name, None)


def rule_names() -> tuple[str, ...]:
    """Every valid ``optimizer.name``, in registration order."""
    _builtins()
    return tuple(_RULES)


def rule_spec(name: str) -> RuleSpec:
    _builtins()
    spec = _RULES.get(name)
    if spec is None:
        raise ValueError(f"unknown optimizer {name!r} (expected one of: {', '.join(_RULES)})")
    return spec


def declared_keys() -> dict[str, Key]:
    """Every optimizer-specific config key, in declaration order."""
    _builtins()
    return dict(_KEYS)


def key_defaults(key: str) -> dict[str, Any]:
    """{optimizer name: default} over the optimizers that read ``key``."""
    _builtins()
    return {n: s.hyper[key] for n, s in _RULES.items() if key in s.hyper}


def structural_keys(name: str) -> tuple[str, ...]:
    """Config keys a checkpoint of optimizer ``name`` must agree on to be resumed ("name" first)."""
    return ("name", *rule_spec(name).structural)


def inapplicable(name: str, key: str) -> str | None:
    """None if ``optimizer.<key>`` applies to optimizer ``name``, else why not (one line)."""
    spec = rule_spec(name)
    if key in spec.hyper or key in GENERIC_KEYS or key == "name":
        return None
    users = [n for n, s in _RULES.items() if key in s.hyper]
    msg = f"does not apply to optimizer.name={name}"
    if key in spec.hints:
        msg += f"; {spec.hints[key]}"
    elif users:
        msg += f" (it is read by {', '.join(users)})"
    keys = ", ".join(spec.hyper) or "none besides the generic ones"
    return f"{msg}; {name}'s own keys: {keys}"


def rule_kwargs(name: str, hyper: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of optimizer ``name``'s rule from optimizer.* values.

    A value of None means the default. Generic keys are ignored (the engine applies them); a
    non-None value for a key the optimizer does not read is an error, never silently dropped."""
    spec = rule_spec(name)
    problems = []
    for k, v in hyper.items():
        if k in spec.hyper or k in GENERIC_KEYS or v is None and k in _KEYS:
            continue
        why = inapplicable(name, k) if k in _KEYS else "unknown optimizer key"
        problems.append(f"optimizer.{k}: {why}")
    if problems:
        raise ValueError("; ".join(problems))
    values = {k: (default if hyper.get(k) is None else hyper[k]) for k, default in spec.hyper.items()}
    return {**spec.fixed, **values}
