"""Weights & Biases glue: resolve ``wandb.init`` arguments, start a run, read ``.wandb`` files back.

Precedence: a standard ``WANDB_*`` environment variable beats the matching ``tracking.wandb.*`` key
(``WANDB_MODE`` over ``mode``, ``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_RUN_GROUP``,
``WANDB_NAME``, ``WANDB_TAGS``, ``WANDB_DIR``; ``WANDB_DISABLED=true`` means mode ``disabled``).
The run directory is the default ``dir``. The run id passed by the caller (from a checkpoint) wins over
``WANDB_RUN_ID``; ``resume="allow"`` always, so the same id continues the same run.

Secrets: the config is redacted by the caller; ``sys.argv`` (which W&B records as the run's
command line) is redacted while ``wandb.init`` runs (``key=value`` tokens with a key/token/password-like
key, the value after such a ``--flag``, and values of secret-named environment variables).

The ``.wandb`` file is a LevelDB-style log (7-byte file header ``":W&B" <magic u16> <version u8>``,
then 32 KiB blocks of ``<crc32 u32><length u16><type u8>`` chunks holding protobuf ``Record``
messages); :func:`iter_wandb_records` reads it with wandb's own protobuf classes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import string
import struct
import sys
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_opt.config.schema import WandbConfig
from dist_opt.config.secrets import REDACTED, env_secret_values, is_secret_name, scrub_values

RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MODES = {
    "online": "online",
    "run": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
    "shared": "shared",
}
# init kwarg -> the environment variable that overrides it
_ENV_OVERRIDES = {
    "project": "WANDB_PROJECT",
    "entity": "WANDB_ENTITY",
    "group": "WANDB_RUN_GROUP",
    "name": "WANDB_NAME",
    "tags": "WANDB_TAGS",
    "dir": "WANDB_DIR",
}


def new_run_id(length: int = 8) -> str:
    """A random W&B-compatible run id (base 36)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def check_run_id(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id):
        raise ValueError(f"W&B run id {run_id!r}: use 1-64 characters of [A-Za-z0-9_-]")
    return run_id


def effective_mode(wcfg: WandbConfig, env: Mapping[str, str] | None = None) -> str:
    """``WANDB_MODE`` (or ``WANDB_DISABLED=true``) if set, else ``tracking.wandb.mode``."""
    env = os.environ if env is None else env
    raw = env.get("WANDB_MODE", "").strip().lower()
    if raw:
        if raw not in _MODES:
            raise ValueError(f"WANDB_MODE={raw!r}: expected one of online, offline, disabled, shared")
        return _MODES[raw]
    if env.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        return "disabled"
    return wcfg.mode


def init_kwargs(
    wcfg: WandbConfig,
    run_dir: str | os.PathLike,
    run_id: str,
    config: dict,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    """Keyword arguments for ``wandb.init``, or None when W&B is disabled."""
    env = os.environ if env is None else env
    mode = effective_mode(wcfg, env)
    if mode == "disabled":
        return None
    values: dict[str, Any] = {
        "project": wcfg.project,
        "entity": wcfg.entity,
        "group": wcfg.group,
        "name": wcfg.name,
        "tags": list(wcfg.tags) or None,
        "dir": str(wcfg.dir if wcfg.dir is not None else run_dir),
    }
    values = scrub_values(values, env_secret_values(env))  # a secret value never names a run
    kwargs: dict[str, Any] = {
        k: v for k, v in values.items() if v is not None and not env.get(_ENV_OVERRIDES[k])
    }
    kwargs.update(mode=mode, id=check_run_id(run_id), resume="allow", config=config, reinit="create_new")
    return kwargs


def redact_argv(argv: Sequence[str], secret_values: Sequence[str] = ()) -> list[str]:
    """``argv`` with secret-looking values replaced: ``key=value`` tokens whose text names a key/token/
    password-like word, the value of such a ``--flag``, and known secret values anywhere."""
    out: list[str] = []
    hide_next = False
    for tok in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        key, eq, _ = tok.partition("=")
        if tok.startswith("-") and is_secret_name(key):
            out.append(f"{key}={REDACTED}" if eq else tok)
            hide_next = not eq
        elif eq and is_secret_name(tok):  # a secret key, or a YAML value holding one ({api_token: ..})
            out.append(f"{key}={REDACTED}")
        else:
            for s in secret_values:
                tok = tok.replace(s, REDACTED)
            out.append(tok)
    return out


@contextlib.contextmanager
def _argv_redacted() -> Iterator[None]:
    saved = sys.argv
    sys.argv = redact_argv(saved, env_secret_values())
    try:
        yield
    finally:
        sys.argv = saved


def start_run(kwargs: dict[str, Any]) -> Any:
    """``wandb.init(**kwargs)`` with a redacted ``sys.argv``; the ``dir`` is created first."""
    import wandb

    if "dir" in kwargs:
        Path(kwargs["dir"]).mkdir(parents=True, exist_ok=True)
    with _argv_redacted():
        return wandb.init(**kwargs)


# ---------------------------------------------------------------------------------------------
# reading .wandb files back

_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_BLOCK = 32768
_IDENT = b":W&B"
_MAGIC = 0xBEE1
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _iter_payloads(path: str | os.PathLike, strict: bool = True) -> Iterator[bytes]:
    """Raw record payloads of a ``.wandb`` file (chunks reassembled, checksums verified)."""
    data = Path(path).read_bytes()
    if len(data) < _HEADER.size:
        raise ValueError(f"{path}: too short for a .wandb file")
    ident, magic, _version = _HEADER.unpack_from(data, 0)
    if ident != _IDENT or magic != _MAGIC:
        raise ValueError(f"{path}: not a .wandb file (bad header)")
    pos, pending = _HEADER.size, bytearray()
    while pos + _CHUNK.size <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _CHUNK.size:  # block trailer padding
            pos += room
            continue
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        start, end = pos + _CHUNK.size, pos + _CHUNK.size + length
        if kind == 0 and length == 0 and crc == 0:  # zero padding
            pos += room
            continue
        if end > len(data):  # torn tail
            return
        chunk = data[start:end]
        bad = None
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            bad = f"checksum mismatch at byte {pos}"
        elif kind not in (_FULL, _FIRST, _MIDDLE, _LAST):
            bad = f"unknown chunk type {kind} at byte {pos}"
        if bad is not None:
            if strict:
                raise ValueError(f"{path}: {bad}")
            return
        pos = end
        if kind == _FULL:
            yield bytes(chunk)
        elif kind == _FIRST:
            pending = bytearray(chunk)
        elif kind == _MIDDLE:
            pending += chunk
        else:
            yield bytes(pending + chunk)
            pending = bytearray()


def iter_wandb_records(path: str | os.PathLike, strict: bool = True) -> Iterator[Any]:
    """Protobuf ``Record`` messages of a ``.wandb`` file, checksums verified; stops at a torn tail.

    ``strict=False``: stop quietly at the first corrupt chunk instead of raising ``ValueError``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in _iter_payloads(path, strict):
        # protobuf builds the message classes at import time; wandb's package declares none of them
        rec = pb.Record()  # type: ignore[attr-defined]
        rec.ParseFromString(payload)
        yield rec


def has_exit_record(path: str | os.PathLike, last: int = 8) -> bool:
    """Whether one of the last ``last`` records of a ``.wandb`` file is the run's exit record."""
    from wandb.proto import wandb_internal_pb2 as pb

    try:
        tail = list(_iter_payloads(path, strict=False))[-last:]
    except (OSError, ValueError):
        return False
    for payload in reversed(tail):
        # protobuf builds the message classes at import time; wandb's package declares none of them
        rec = pb.Record()  # type: ignore[attr-defined]
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "exit":
            return True
    return False


def wait_for_exit_record(path: str | os.PathLike, timeout_s: float = 30.0) -> bool:
    """Wait until W&B has written the exit record (``run.finish()`` returns before the service's writer
    has flushed the file). False on timeout."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        if has_exit_record(path):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _item_key(item: Any) -> str:
    return item.key if item.key else ".".join(item.nested_key)


@dataclass
class WandbRunFile:
    """What a ``.wandb`` file holds: run id, config, history rows, summary, exit code, argv."""

    path: Path
    run_id: str = ""
    project: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    args: list[str] = field(default_factory=list)


def read_wandb_file(path: str | os.PathLike) -> WandbRunFile:
    """Decode a ``.wandb`` file (config values and history values parsed from JSON)."""
    out = WandbRunFile(path=Path(path))

    def config_update(cfg: Any) -> None:
        for it in cfg.update:
            out.config[_item_key(it)] = json.loads(it.value_json)
        for it in cfg.remove:
            out.config.pop(_item_key(it), None)

    for rec in iter_wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.run_id, out.project = rec.run.run_id, rec.run.project
            config_update(rec.run.config)
        elif kind == "config":
            config_update(rec.config)
        elif kind == "history":
            out.history.append({_item_key(it): json.loads(it.value_json) for it in rec.history.item})
        elif kind == "summary":
            for it in rec.summary.update:
                out.summary[_item_key(it)] = json.loads(it.value_json)
            for it in rec.summary.remove:
                out.summary.pop(_item_key(it), None)
        elif kind == "environment" and rec.environment.args:
            out.args = list(rec.environment.args)
        elif kind == "exit":
            out.exit_code = rec.exit.exit_code
    out.config.pop("_wandb", None)
    return out


def find_wandb_files(root: str | os.PathLike, run_id: str | None = None) -> list[Path]:
    """``.wandb`` files under ``root`` (a wandb dir or its parent), oldest run directory first."""
    root = Path(root)
    files = [p for p in root.rglob("*.wandb") if p.parent.name != "latest-run" and not p.parent.is_symlink()]
    if run_id is not None:
        files = [p for p in files if p.name == f"run-{run_id}.wandb"]

    def order(p: Path) -> tuple[str, int, str]:  # start time, then the "-1", "-2"... suffix of a reuse
        m = re.search(r"\d{8}_\d{6}", p.parent.name)
        return (m.group(0) if m else "", len(p.parent.name), p.parent.name)

    return sorted(files, key=order)


def last_history_step(files: Sequence[str | os.PathLike]) -> int | None:
    """Largest history ``_step`` persisted in these ``.wandb`` files (None: no history rows)."""
    last: int | None = None
    for f in files:
        for rec in iter_wandb_records(f, strict=False):
            if rec.WhichOneof("record_type") != "history":
                continue
            for it in rec.history.item:
                if _item_key(it) == "_step":
                    step = int(json.loads(it.value_json))
                    last = step if last is None else max(last, step)
    return last


def previous_sessions_last_step(run: Any, mode: str) -> int | None:
    """Last step the W&B run already holds from earlier sessions of the same id.

    online: what the server reports on resume (``run.starting_step - 1``); offline: the largest
    step in the local ``.wandb`` files of this run id (other than this session's) under the W&B dir.
    None when unknown or empty.
    """
    if mode == "online":
        return run.starting_step - 1 if run.resumed and run.starting_step > 0 else None
    if mode != "offline":
        return None
    current = Path(run.settings.sync_file).resolve()
    files = [f for f in find_wandb_files(run.settings.wandb_dir, run.id) if f.resolve() != current]
    return last_history_step(files)
