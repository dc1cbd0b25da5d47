"""The ``optimizer`` config section, derived from the optimizer declarations (``dist_opt.optim.catalog``):
the generic keys every optimizer accepts, plus one typed field per key any registered optimizer reads.
Imported by ``schema``; ``dist_opt.config.schema.OptimizerConfig`` is the same class."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationInfo, create_model, field_validator
from pydantic_core import PydanticCustomError

from dist_opt.config.types import NonNegFloat, PosFloat, Section
from dist_opt.optim.spec import (
    DEFAULT_EXCLUDE,
    declared_keys,
    inapplicable,
    key_defaults,
    rule_names,
    rule_spec,
)

__all__ = ["OptimizerConfig"]


def _default_exclude() -> list[str]:
    """The engine's default exclusion patterns (imported when needed: the engine imports the config)."""
    return list(DEFAULT_EXCLUDE)


class _OptimizerBase(Section):
    """optimizer.*: the optimizer and the keys every optimizer accepts. Each optimizer's own keys
    (``_optimizer_fields``) come from its declaration (``dist_opt.optim.catalog``)."""

    name: str = Field(
        default="adamw",
        description=(
            f"Optimizer: {', '.join(rule_names())}. Defaults of every hyper-parameter come from its paper / "
            "torch.optim. Setting a key the optimizer does not read is an error."
        ),
    )
    lr: PosFloat = 1e-3
    """Base learning rate (before schedule and scale rule)."""
    weight_decay: NonNegFloat = Field(
        default=0.0,
        description=(
            f"L2 ({', '.join(n for n in rule_names() if not rule_spec(n).decoupled_weight_decay)}) or decoupled "
            f"({', '.join(n for n in rule_names() if rule_spec(n).decoupled_weight_decay)}) weight decay."
        ),
    )
    exclude_from_weight_decay: list[str] = Field(default_factory=_default_exclude)
    """Name substrings/regexes of parameters without weight decay (1-D parameters are always excluded)."""
    exclude_from_trust_ratio: list[str] = Field(
        default_factory=_default_exclude,
        description=(
            "Name patterns of parameters whose trust ratio is 1 "
            f"({', '.join(n for n in rule_names() if rule_spec(n).trust_ratio)}); 1-D parameters are always excluded."
        ),
    )
    lr_multipliers: dict[str, PosFloat] = Field(default_factory=dict)
    """Per-group lr multipliers: {name regex: multiplier}; the first matching pattern wins."""
    max_grad_norm: PosFloat | None = None
    """Global gradient-norm clipping on the reduced gradient over all shards (None: off)."""

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in rule_names():
            raise PydanticCustomError(
                "unknown_optimizer",
                "unknown optimizer; expected one of: {names}",
                {"names": ", ".join(rule_names())},
            )
        return name

    @field_validator("*")
    @classmethod
    def _applies(cls, value: Any, info: ValidationInfo) -> Any:
        """A key set (in the file, an override or the constructor) for an optimizer that does not read
        it is an error; keys left unset never are. A key set to its default value is accepted: config.yaml
        files written before this check list every key."""
        name = info.data.get("name")
        field = info.field_name
        assert field is not None  # pydantic always names the field for a field validator
        why = None if name is None else inapplicable(name, field)
        if why is not None and value != cls.model_fields[field].default:
            raise PydanticCustomError("inapplicable_key", "{why}", {"why": why})
        return value


def _optimizer_fields() -> dict[str, Any]:
    """One typed field per declared optimizer key: its default is the optimizers' common default, or
    None (= each optimizer's own) where they differ; its description names who reads it."""
    fields: dict[str, Any] = {}
    for key in declared_keys().values():
        defaults = key_defaults(key.name)
        if not defaults:
            continue
        by_default: dict[str, list[str]] = {}
        for opt, d in defaults.items():
            by_default.setdefault(repr(d), []).append(opt)
        common = len(by_default) == 1
        default = next(iter(defaults.values())) if common else None
        who = (
            ", ".join(defaults)
            if common
            else "; ".join(f"{', '.join(o)}: {d}" for d, o in by_default.items())
        )
        ann = key.type if default is not None else key.type | None
        fields[key.name] = (ann, Field(default, description=f"{key.doc} Read by: {who}."))
    return fields


if TYPE_CHECKING:
    # The per-optimizer fields are generated at import time, so a type checker sees the generic keys
    # of the base class precisely and every generated key as ``Any``.
    class OptimizerConfig(_OptimizerBase):
        def __getattr__(self, name: str) -> Any: ...

else:
    OptimizerConfig = create_model(
        "OptimizerConfig",
        __base__=_OptimizerBase,
        __module__=__name__,
        **_optimizer_fields(),
        __doc__="optimizer.*: the generic keys plus one typed field per key any registered optimizer reads.",
    )
