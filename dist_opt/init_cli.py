"""``dist-opt init [NAME] [--out FILE] [--force] [--list]``: write a starter config.

The starter configs ship inside the package (``dist_opt/configs/*.yaml``); ``--list`` shows them
with their first comment line. The default is ``quickstart``, written to ``NAME.yaml`` in the
current directory (``--out -`` prints it). An existing file is kept unless ``--force`` is given.
Exit codes: 0 written, 2 bad input (unknown name, existing file, bad arguments).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

DEFAULT = "quickstart"
EXIT_OK, EXIT_BAD_INPUT = 0, 2


class InitError(Exception):
    """Bad input to ``dist-opt init``; the message is one line."""


class _ArgParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2 instead of a usage dump
        raise InitError(f"{message} (usage: dist-opt init [NAME] [--out FILE] [--force] [--list])")


def starter_configs() -> dict[str, str]:
    """Name -> YAML text of every starter config shipped with the package."""
    folder = files("dist_opt").joinpath("configs")
    return {
        p.name[:-5]: p.read_text(encoding="utf-8")
        for p in sorted(folder.iterdir(), key=lambda p: p.name)
        if p.name.endswith(".yaml")
    }


def _summary(text: str, width: int = 100) -> str:
    """The first sentence of the config's leading comment, cut to ``width`` characters."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    sentence = re.split(r"(?<=\.)\s", " ".join(lines), maxsplit=1)[0].rstrip(".")
    return sentence if len(sentence) <= width else sentence[: width - 3].rstrip() + "..."


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = _ArgParser(prog="dist-opt init", description="Write a starter config.", allow_abbrev=False)
    p.add_argument("name", nargs="?", default=DEFAULT, help=f"starter config (default {DEFAULT}; see --list)")
    p.add_argument("--out", help="file to write (default NAME.yaml; - prints it)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.add_argument("--list", action="store_true", help="list the starter configs and exit")
    return p.parse_args(list(argv))


def write_config(name: str, out: str | None = None, force: bool = False) -> str:
    """Write starter config ``name`` to ``out`` (default ``NAME.yaml``; ``-``: stdout); returns the
    path written. InitError for an unknown name or an existing file without ``force``."""
    configs = starter_configs()
    text = configs.get(name)
    if text is None:
        raise InitError(f"unknown starter config {name!r} (choose from {', '.join(configs)})")
    if out == "-":
        sys.stdout.write(text)
        return "-"
    path = Path(out or f"{name}.yaml")
    if path.exists() and not force:
        raise InitError(f"{path} exists (pass --force to overwrite it)")
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise InitError(f"cannot write {path}: {e.strerror or e}") from None
    return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.list:
            configs = starter_configs()
            width = max(map(len, configs))
            for name, text in configs.items():
                print(f"{name:<{width}}  {_summary(text)}")
            return EXIT_OK
        path = write_config(args.name, args.out, args.force)
    except InitError as e:
        print(f"dist-opt init: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if path != "-":
        print(f"wrote {path} (run it: dist-opt train {path})")
    return EXIT_OK
