"""Secret handling shared by the config dump, checkpoints and tracking.

Two rules keep secrets out of ``config.yaml``, checkpoint manifests and W&B: the value of a key
whose name looks secret (``api_token``, ``password``...) is replaced, and any string equal to
(or containing) the value of a secret-named environment variable (``WANDB_API_KEY``...) is
replaced wherever it appears, whatever key holds it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

SECRET_WORDS = ("key", "token", "password", "secret", "passwd", "credential")
REDACTED = "<redacted>"
MIN_SECRET_LEN = 4  # shorter environment values are too likely to collide with ordinary text


def is_secret_name(name: str) -> bool:
    """Whether a key or variable name looks like it holds a secret."""
    name = name.lower()
    return any(w in name for w in SECRET_WORDS)


def env_secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose name looks secret, longest first."""
    env = os.environ if env is None else env
    vals = {v for k, v in env.items() if is_secret_name(k) and len(v) >= MIN_SECRET_LEN}
    return sorted(vals, key=len, reverse=True)


def scrub_values(obj: Any, secret_values: Sequence[str]) -> Any:
    """Copy of a JSON-like tree with every occurrence of a known secret value replaced."""
    if isinstance(obj, dict):
        return {k: scrub_values(v, secret_values) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [scrub_values(v, secret_values) for v in obj]
    if isinstance(obj, str):
        for s in secret_values:
            obj = obj.replace(s, REDACTED)
    return obj


def redact_keys(obj: Any) -> Any:
    """Copy of a config tree with the values of secret-looking keys replaced."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, str) and is_secret_name(k) and isinstance(v, str | int):
                out[k] = REDACTED
            else:
                out[k] = redact_keys(v)
        return out
    if isinstance(obj, list):
        return [redact_keys(v) for v in obj]
    return obj


def redact(obj: Any, env: Mapping[str, str] | None = None) -> Any:
    """Both rules: secret-named keys, and secret environment values anywhere."""
    return scrub_values(redact_keys(obj), env_secret_values(env))
