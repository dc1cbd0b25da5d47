"""Hostfiles in the DeepSpeed / Open MPI format: ``host slots=N`` per line, ``#`` comments.

Every problem is a :class:`LaunchError` naming the file and line. ``slots`` may be left out
(Open MPI's default of one slot); any other field is an error rather than being ignored.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from dist_opt.launch.errors import LaunchError

_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class Host:
    """One hostfile entry: a host name or address and its slots (processes it may run)."""

    name: str
    slots: int
    line: int = 0


def is_valid_host(name: str) -> bool:
    """An IPv4/IPv6 address or an RFC 1123 host name (letters, digits, '-', dot-separated labels)."""
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    if not name or len(name) > 253:
        return False
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    return all(_LABEL.match(label) for label in labels)


def is_local(name: str | None) -> bool:
    """Hosts started on this machine without ssh."""
    return name is None or name in LOCAL_NAMES


def parse_hostfile(text: str, source: str = "<hostfile>") -> list[Host]:
    """Hosts in file order; raises :class:`LaunchError` on the first bad line."""
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        name, *fields = line.split()
        if not is_valid_host(name):
            raise LaunchError(f"{where}: {name!r} is not a valid host name or address")
        slots = 1
        for item in fields:
            key, eq, value = item.partition("=")
            if key != "slots" or not eq:
                raise LaunchError(f"{where}: unknown field {item!r} (expected 'HOST slots=N')")
            try:
                slots = int(value)
            except ValueError:
                raise LaunchError(f"{where}: slots={value!r} is not an integer") from None
            if slots <= 0:
                raise LaunchError(f"{where}: slots={slots} must be a positive integer")
        if len([f for f in fields if f.startswith("slots=")]) > 1:
            raise LaunchError(f"{where}: slots given more than once")
        if name in seen:
            raise LaunchError(f"{where}: duplicate host {name!r} (first given on line {seen[name]})")
        seen[name] = lineno
        hosts.append(Host(name=name, slots=slots, line=lineno))
    if not hosts:
        raise LaunchError(f"{source}: no hosts (expected lines of 'HOST slots=N')")
    return hosts


def read_hostfile(path: str | Path) -> list[Host]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LaunchError(f"{path}: hostfile not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LaunchError(f"{path}: cannot read hostfile: {e}") from None
    return parse_hostfile(text, source=str(path))
