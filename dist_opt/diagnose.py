"""One clear line for a run that failed: a failed collective, a failed checkpoint write, a full disk.

:func:`explain` is what ``dist-opt train`` prints instead of a traceback (exit code 1); it returns
None for anything else (a bug: the traceback is shown). A failed collective names the
torch.distributed call, where dist-opt made it, the step, ``distributed.timeout_s``, the missing
ranks (from :mod:`dist_opt.peers`) and the backend's own message::

    dist-opt: rank 0: async collective (wait at dist_opt/engine/grad_sync.py:146 in GradSync.finish)
    timed out after step 3 (distributed.timeout_s=10); missing: rank 1 is alive but did not join (hung
    after step 3); same failure on rank(s) 2; backend: Timed out waiting 10000ms for recv operation
"""

from __future__ import annotations

import errno
import linecache
import os
import re
import shutil
import traceback
from pathlib import Path

_C10D_FILE = os.path.join("torch", "distributed", "distributed_c10d.py")
_BACKEND_TEXT = re.compile(
    r"gloo|nccl|Timed out waiting|Connection (closed|reset) by peer|Socket Timeout", re.I
)
_PKG_DIR = str(Path(__file__).resolve().parent)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG})


def _frames(exc: BaseException) -> list[tuple[str, int, str, str]]:
    """(file, line, qualified function name, source line) of each traceback frame, outermost first."""
    out = []
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        code = frame.f_code
        name = getattr(code, "co_qualname", code.co_name)
        out.append((code.co_filename, lineno, name, linecache.getline(code.co_filename, lineno).strip()))
    return out


def _chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def is_collective_failure(exc: BaseException) -> bool:
    """A collective (or a wait on one) failed: timeout, lost peer, broken process group."""
    try:
        import torch.distributed as dist

        if isinstance(exc, dist.DistError):
            return True
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    if not isinstance(exc, RuntimeError):
        return False
    if any(f[0].endswith(_C10D_FILE) for f in _frames(exc)):
        return True
    return bool(_BACKEND_TEXT.search(str(exc)))


def collective_name(exc: BaseException) -> str:
    """The torch.distributed call that failed (outermost frame in distributed_c10d) and where dist-opt
    called it, e.g. ``all_reduce (at dist_opt/trainer.py:277 in Trainer.train_step)``; a failed wait on an
    async collective is ``async collective (wait at dist_opt/engine/grad_sync.py:146 in GradSync.finish)``."""
    frames = _frames(exc)
    op = next((name for file, _, name, _ in frames if file.endswith(_C10D_FILE)), None)
    ours = [f for f in frames if str(Path(f[0]).resolve()).startswith(_PKG_DIR + os.sep)]
    where = ""
    if ours:
        file, lineno, name, line = ours[-1]
        where = f"{os.path.relpath(file, str(Path(_PKG_DIR).parent))}:{lineno} in {name}"
        if op is None and ".wait(" in line:
            return f"async collective (wait at {where})"
    op = op or "collective"
    return f"{op} (at {where})" if where else op


def backend_message(exc: BaseException) -> str:
    """First line of the backend's error without its source-file prefix and boilerplate advice."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\][\s.]*", "", text)
    text = re.sub(r"\s*This is typically caused by.*$", "", text)
    from dist_opt.checkpoint.errors import scrub  # never pass on advice to load with weights_only=False

    return scrub(text)


def explain_collective_failure(exc: BaseException, rank: int) -> str | None:
    """One line for a failed collective (None: not one). Runs the post-mortem of the active run's
    peer monitor (up to its grace period) to name the missing ranks."""
    if not is_collective_failure(exc):
        return None
    from dist_opt.faults import active

    ext = active()
    trainer = getattr(ext, "trainer", None)
    name = collective_name(exc)
    msg = backend_message(exc)
    kind = "timed out" if re.search(r"timed? ?out", msg, re.I) else "failed"
    parts = [f"dist-opt: rank {rank}: {name} {kind}"]
    if trainer is not None:
        timeout = trainer.cfg.distributed.timeout_s
        parts[0] += f" after step {trainer.step} (distributed.timeout_s={timeout:g})"
        monitor = getattr(ext, "monitor", None)
        if monitor is not None:
            try:
                detail = monitor.post_mortem(name, trainer.step)
            except Exception as e:  # noqa: BLE001 - diagnostics must not hide the failure itself
                detail = f"no peer details ({type(e).__name__})"
            if detail:
                parts.append(detail)
    parts.append(f"backend: {msg}")
    return "; ".join(parts)


def explain_os_error(exc: BaseException) -> str | None:
    """One line for a write that failed (disk full, read-only or unwritable run directory)."""
    err = next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in WRITE_ERRNOS), None)
    if err is None:
        return None
    what = f" {err.filename}" if err.filename else ""
    return f"cannot write{what}: {err.strerror or err} (disk full or unwritable run directory)"


def _free_space_note(run_dir: str | os.PathLike | None) -> str:
    if run_dir is None:
        return ""
    try:
        usage = shutil.disk_usage(run_dir)
    except OSError:
        return ""
    full = " (disk full?)" if usage.free < max(2**20, usage.total // 100) else ""
    return f"; {usage.free / 2**20:.1f} MiB free on the file system of {run_dir}{full}"


def explain_checkpoint_failure(exc: BaseException, run_dir: str | os.PathLike | None = None) -> str | None:
    """One line for a failed torch.distributed.checkpoint save/load (DCP gathers every rank's error)."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # pragma: no cover
        return None
    err = next((e for e in _chain(exc) if isinstance(e, CheckpointException)), None)
    if err is None:
        return None
    by_text: dict[str, list[int]] = {}
    for r, wrapped in sorted(err.failures.items()):
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        text = explain_os_error(inner) or f"{type(inner).__name__}: {backend_message(inner)}"
        by_text.setdefault(text, []).append(r)
    causes = "; ".join(f"rank(s) {', '.join(map(str, rs))}: {t}" for t, rs in by_text.items())
    return f"checkpoint write failed ({causes or 'no details'}){_free_space_note(run_dir)}"


def explain(exc: BaseException, rank: int, run_dir: str | os.PathLike | None = None) -> str | None:
    """The one line ``dist-opt train`` prints for a run that failed with ``exc`` (None: a bug, show the
    traceback): a failed collective, a failed checkpoint write, or a failed write to the run directory."""
    line = explain_collective_failure(exc, rank)
    if line is not None:
        return line
    why = explain_checkpoint_failure(exc, run_dir) or explain_os_error(exc)
    return None if why is None else f"dist-opt: rank {rank}: {why}"
