"""Checkpoint folders on disk: naming, manifest, completion marker, validation, latest, keep-last-k.

Layout of one checkpoint (``<run.out_dir>/checkpoints/step-N/``)::

    __0_0.distcp, __1_0.distcp, ...   tensor data, written by every rank in parallel (DCP)
    .metadata                         DCP's index of the tensors (a pickle; read with an allow-list)
    manifest.json                     everything else (counters, schedule, RNG skeletons, ...) and
                                      the size and CRC-32 of every file above
    COMPLETE                          written last, by rank 0, after every rank finished writing:
                                      {"step": N, "manifest_sha256": ...}

A folder without a valid ``COMPLETE`` (a save that was killed), or whose files do not match the
manifest (truncated or corrupt), is not a checkpoint: :func:`find_latest` skips it and says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_opt.checkpoint.errors import CheckpointError

FORMAT = "dist-opt-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
MARKER = "COMPLETE"
DIR_NAME = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")
_CHUNK = 4 * 2**20


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / DIR_NAME


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step}"


def list_step_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step-N`` folder under ``root``, ascending by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def crc32_file(path: Path) -> str:
    """CRC-32 of a file's bytes (detects truncation and corruption at ~2 GB/s; not a defence against
    deliberate tampering -- whoever can rewrite a data file can rewrite the manifest too)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def digest(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "crc32": crc32_file(path)}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def finalize(folder: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest, then the completion marker (the last file of a checkpoint)."""
    data = json.dumps(manifest, indent=1, allow_nan=True).encode()
    write_atomic(folder / MANIFEST, data)
    marker = {"step": manifest["step"], "manifest_sha256": hashlib.sha256(data).hexdigest()}
    write_atomic(folder / MARKER, json.dumps(marker).encode())


def prepare(folder: Path) -> None:
    """Make ``folder`` an empty, incomplete checkpoint folder (a complete one loses its marker first)."""
    if folder.exists():
        marker = folder / MARKER
        if marker.exists():
            marker.unlink()
            _fsync_dir(folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


@dataclass
class Verdict:
    folder: Path
    step: int | None
    problem: str | None  # None: a usable checkpoint

    @property
    def ok(self) -> bool:
        return self.problem is None


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a checkpoint folder that :func:`check` accepted."""
    v = check(folder, deep=False)
    if not v.ok:
        raise CheckpointError([v.problem or "unusable"], folder)
    return json.loads((folder / MANIFEST).read_bytes())


def check(folder: str | Path, deep: bool = True) -> Verdict:
    """Is ``folder`` a complete checkpoint? Quick: marker, manifest, file sizes; ``deep``: file CRCs too."""
    folder = Path(folder)
    m = STEP_DIR.match(folder.name)
    step = int(m.group(1)) if m else None
    if not folder.is_dir():
        return Verdict(folder, step, "not a directory")
    marker = folder / MARKER
    if not marker.is_file():
        return Verdict(folder, step, f"incomplete (no {MARKER} marker: the save did not finish)")
    try:
        mk = json.loads(marker.read_bytes())
        data = (folder / MANIFEST).read_bytes()
        manifest = json.loads(data)
    except (OSError, ValueError) as e:
        return Verdict(folder, step, f"unreadable marker or {MANIFEST} ({e})")
    if not isinstance(mk, dict) or mk.get("manifest_sha256") != hashlib.sha256(data).hexdigest():
        return Verdict(folder, step, f"{MANIFEST} does not match the {MARKER} marker (modified or corrupt)")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return Verdict(folder, step, f"{MANIFEST} is not a dist-opt checkpoint manifest")
    if manifest.get("version") != VERSION:
        return Verdict(
            folder,
            step,
            f"checkpoint format version {manifest.get('version')!r} is not "
            f"supported (this dist-opt reads version {VERSION})",
        )
    step = manifest.get("step", step)
    files = manifest.get("files")
    if not isinstance(files, dict) or ".metadata" not in files:
        return Verdict(folder, step, f"{MANIFEST} lists no files")
    for name, info in files.items():
        p = folder / name
        if "/" in name or name.startswith(".."):
            return Verdict(folder, step, f"{MANIFEST} names a file outside the folder: {name!r}")
        if not p.is_file():
            return Verdict(folder, step, f"file {name} is missing")
        size = p.stat().st_size
        if size != info.get("size"):
            return Verdict(
                folder,
                step,
                f"file {name} has {size} bytes, expected {info.get('size')} (truncated or corrupt)",
            )
    if deep:
        for name, info in files.items():
            if crc32_file(folder / name) != info.get("crc32"):
                return Verdict(folder, step, f"file {name} is corrupt (its CRC-32 differs from the manifest)")
    return Verdict(folder, step, None)


def find_latest(
    root: str | Path, report: Callable[[str], None] | None = None, deep: bool = True
) -> Path | None:
    """Newest usable checkpoint under ``root`` (a ``checkpoints`` folder); unusable newer folders are
    skipped and reported through ``report``."""
    for _, folder in reversed(list_step_dirs(root)):
        v = check(folder, deep=deep)
        if v.ok:
            return folder
        if report is not None:
            report(f"checkpoint {folder} skipped: {v.problem}")
    return None


def complete_steps(root: str | Path) -> list[tuple[int, Path]]:
    """Folders with a valid marker (quick check), ascending by step."""
    return [(s, p) for s, p in list_step_dirs(root) if check(p, deep=False).ok]


def prune(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints, and incomplete folders older than the
    newest complete one (left by killed saves). The newest complete checkpoint is never deleted."""
    keep = max(1, keep)
    complete = complete_steps(root)
    if not complete:
        return []
    newest = complete[-1][0]
    keep_set = {p for _, p in complete[-keep:]}
    removed = []
    for step, folder in list_step_dirs(root):
        if folder in keep_set or step > newest:
            continue
        marker = folder / MARKER
        if marker.exists():
            marker.unlink()
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed
