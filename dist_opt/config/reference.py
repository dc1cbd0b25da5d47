"""Render the config reference (README section) from the schema, so docs cannot drift.

python -m dist_opt.config.reference            # print the markdown
python -m dist_opt.config.reference --write    # update README.md between the markers
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

from dist_opt.config.schema import Config

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def _rows(model: type[BaseModel], prefix: str = ""):
    for name, f in model.model_fields.items():
        key = f.alias or name
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _rows(ann, f"{prefix}{key}.")
            continue
        default = f.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            continue
        yield f"{prefix}{key}", repr(default), (f.description or "").replace("|", "\\|")


def render() -> str:
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, desc in _rows(Config):
        lines.append(f"| `{key}` | `{default}` | {desc} |")
    return "\n".join(lines)


def readme_section(text: str) -> str:
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str]) -> int:
    table = render()
    if "--write" in argv:
        readme = Path(__file__).resolve().parents[2] / "README.md"
        text = readme.read_text(encoding="utf-8")
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(f"{head}{START}\n{table}\n{END}{tail}", encoding="utf-8")
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
