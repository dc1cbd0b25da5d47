"""SLURM node-list expansion (``node[01-03,07],gpu5`` -> hostnames), without shelling out."""

from __future__ import annotations

import re
import shutil
import subprocess

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise ValueError(f"unbalanced brackets in SLURM node list {text!r}")
    out.append(cur)
    return [x for x in out if x]


def expand_nodelist(text: str) -> list[str]:
    hosts: list[str] = []
    for item in _split_top(text.strip()):
        m = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", item)
        if not m:
            hosts.append(item)
            continue
        prefix, body, suffix = m.groups()
        for part in body.split(","):
            r = _RANGE.match(part.strip())
            if not r:
                raise ValueError(f"bad range {part!r} in SLURM node list {text!r}")
            lo, hi = r.group(1), r.group(2) or r.group(1)
            width = len(lo)
            for i in range(int(lo), int(hi) + 1):
                for tail in expand_nodelist(suffix) if suffix else [""]:
                    hosts.append(f"{prefix}{i:0{width}d}{tail}")
    return hosts


def hostnames(nodelist: str) -> list[str]:
    """Use ``scontrol show hostnames`` when SLURM is installed, else parse the list ourselves."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], check=True,
                                 capture_output=True, text=True, timeout=30).stdout
            return [h for h in out.split() if h]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)
