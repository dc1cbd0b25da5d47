"""YAML file + dotted ``key=value`` overrides -> validated :class:`Config`.

Every problem becomes one line naming the dotted key (or the file and line for YAML
syntax errors); callers turn a :class:`ConfigError` into exit code 2 without writing anything.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from dist_opt.config.schema import Config
from dist_opt.config.secrets import SECRET_WORDS, redact

__all__ = ["SECRET_WORDS", "ConfigError", "dump_yaml", "load_config", "redact", "to_dict", "validate"]


class ConfigError(Exception):
    """A bad config; ``problems`` holds one readable line per problem."""

    exit_code = 2

    def __init__(self, problems: Sequence[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__("\n".join(f"config error: {where}{p}" for p in self.problems))


def _parse_value(text: str) -> Any:
    """An override's value is YAML (``1e-3``, ``[1, 2]``, ``true``, ``null``); bare words stay strings."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: an integer of > 4300 digits
        return text


def apply_overrides(tree: dict, overrides: Sequence[str]) -> dict:
    tree = copy.deepcopy(tree)
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected dotted.key=value")
            continue
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            problems.append(f"override {item!r}: empty key segment")
            continue
        node = tree
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                problems.append(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {key}")
                break
            node = nxt
        else:
            node[parts[-1]] = _parse_value(raw)
    if problems:
        raise ConfigError(problems)
    return tree


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first != line:
                raise _DuplicateKey(f"duplicate key {key!r} at line {line} (first given at line {first})")
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(ValueError):
    pass


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(["file not found (expected a YAML config file)"], source=str(path))
    try:
        text = p.read_text(encoding="utf-8")
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"YAML syntax error at {line}{problem}"], source=str(path)) from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError([f"cannot read: {e}"], source=str(path)) from None
    except RecursionError:
        raise ConfigError(["YAML nested too deeply"], source=str(path)) from None
    except _DuplicateKey as e:
        raise ConfigError([str(e)], source=str(path)) from None
    except ValueError as e:  # e.g. an integer literal longer than Python's int conversion limit
        raise ConfigError([f"YAML value error: {e}"], source=str(path)) from None
    if data is None:
        what = "is empty" if not text.strip() else "holds only comments"
        raise ConfigError(
            [
                f"the file {what} (expected a mapping of sections, e.g. `train: {{steps: 100}}`; "
                "`dist-opt init` writes a starter config)"
            ],
            source=str(path),
        )
    if not isinstance(data, dict):
        raise ConfigError(
            [f"top level must be a mapping of sections, got {type(data).__name__}"], source=str(path)
        )
    return data


def _describe(err: ErrorDetails) -> str:
    loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, int) or True)
    msg = err["msg"]
    kind = err["type"]
    if kind == "extra_forbidden":
        msg = "unknown key"
    elif "input" in err and kind not in ("missing",) and not isinstance(err["input"], dict):
        msg = f"{msg} (got {err['input']!r})"
    return f"{loc}: {msg}" if loc else msg


def validate(tree: dict, source: str | None = None) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError([_describe(err) for err in e.errors(include_url=False)], source=source) from None


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    tree = read_yaml(path) if path is not None else {}
    tree = apply_overrides(tree, overrides)
    return validate(tree, source=str(path) if path is not None else None)


def to_dict(cfg: Config) -> dict:
    """The config as plain data, secrets redacted (by key name and by environment value)."""
    return redact(cfg.model_dump(mode="json", by_alias=True))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
