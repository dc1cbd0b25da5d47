"""The pieces of a chaos run that touch the machine: processes, a small disk, checkpoint files.

* Every process of one attempt (the ``dist-opt train`` launcher and the ranks it starts) carries
  ``DIST_OPT_CHAOS_RUN=<token>`` in its environment; :func:`marked_pids` finds them by scanning
  ``/proc``, whoever their parent is by then, so a rank that outlived its launcher is found too.
* :class:`SmallDisk`: a size-limited tmpfs (needs root) that can be filled with a ballast file, so
  that a checkpoint save meets a real ``ENOSPC``.
* :func:`corrupt_newest`: garble a data file of the newest complete checkpoint (same size, other
  bytes: only the CRC-32 check of a resume can tell).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

MARK_VAR = "DIST_OPT_CHAOS_RUN"


# -- processes ---------------------------------------------------------------------------------------
def _environ(pid: int) -> dict[bytes, bytes]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.split(b"=", 1) for x in raw if b"=" in x)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie has ended; only its entry is left)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in ("Z", "X")


def marked_pids(token: str) -> dict[int, dict[bytes, bytes]]:
    """Live processes whose environment has ``DIST_OPT_CHAOS_RUN=token``: pid -> environment."""
    want = token.encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        with contextlib.suppress(OSError, ValueError):
            env = _environ(pid)
            if env.get(MARK_VAR.encode()) == want and alive(pid):
                found[pid] = env
    return found


def rank_pids(token: str, world: int, timeout_s: float = 60.0) -> dict[int, int]:
    """rank -> pid of the training ranks of attempt ``token`` (processes with a ``RANK`` variable)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = {}
        for pid, env in marked_pids(token).items():
            with contextlib.suppress(OSError):
                if b"dist_opt.train" in Path(f"/proc/{pid}/cmdline").read_bytes() and b"RANK" in env:
                    found[int(env[b"RANK"])] = pid
        if len(found) == world or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def reap_orphans(token: str, wait_s: float = 10.0) -> list[int]:
    """Wait up to ``wait_s`` for every process of attempt ``token`` to end by itself; SIGKILL those
    still alive then (they are orphans: the run cannot go on beside them) and return their pids."""
    deadline = time.monotonic() + wait_s
    while marked_pids(token) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = sorted(marked_pids(token))
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 10.0
    while any(alive(p) for p in left) and time.monotonic() < end:
        time.sleep(0.1)
    return left


def send(pid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to ``pid``; False when it has already gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


# -- run directory ------------------------------------------------------------------------------------
def last_step(run_dir: Path) -> int:
    """The highest training step in ``metrics.jsonl`` (0 if none). A resumed run drops the lines
    after its resumed step, so right after an attempt this is the last step it reached."""
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except OSError:
        return 0
    best = 0
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict) and "loss" in row and isinstance(row.get("step"), int):
                best = max(best, row["step"])
    return best


def step_losses(run_dir: Path) -> dict[int, list[float]]:
    """step -> the training losses logged for it in ``metrics.jsonl`` (one each in a clean file)."""
    out: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict) and "loss" in row and isinstance(row.get("step"), int):
                out.setdefault(row["step"], []).append(row["loss"])
    return out


def newest_usable_step(run_dir: Path) -> int:
    """Step of the checkpoint ``resume=latest`` takes now (0: none, a fresh start)."""
    from dist_opt.checkpoint import store

    found = store.find_latest(store.checkpoints_dir(run_dir), deep=True)
    return 0 if found is None else int(found.name.split("-", 1)[1])


def corrupt_newest(run_dir: Path) -> tuple[int, Path] | None:
    """Garble the middle of the largest data file of the newest complete checkpoint (size kept);
    returns (its step, the file), or None when there is no complete checkpoint."""
    from dist_opt.checkpoint import store

    folder = store.find_latest(store.checkpoints_dir(run_dir), deep=True)
    if folder is None:
        return None
    shard = max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(len(data), mid + 64)):
        data[i] ^= 0x5A
    shard.write_bytes(bytes(data))
    return int(folder.name.split("-", 1)[1]), shard


# -- a small disk -------------------------------------------------------------------------------------
class SmallDisk:
    """A tmpfs of ``size`` mounted at ``path`` (root only); :meth:`fill` leaves ``leave_bytes`` free."""

    BALLAST = ".chaos-ballast"

    def __init__(self, path: Path, size: str = "32m"):
        self.path, self.size = path, size
        self.mounted = False
        self.problem: str | None = None

    def mount(self) -> bool:
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path)],
                check=True,
                capture_output=True,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.SubprocessError) as e:
            stderr = getattr(e, "stderr", "") or ""
            self.problem = f"cannot mount a tmpfs at {self.path}: {stderr.strip() or e}"
            return False
        self.mounted = True
        return True

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave_bytes: int) -> None:
        """Write a ballast file until only about ``leave_bytes`` are left."""
        with (self.path / self.BALLAST).open("ab") as f, contextlib.suppress(OSError):
            f.write(b"\0" * max(0, self.free_bytes() - leave_bytes))

    def clear(self) -> None:
        (self.path / self.BALLAST).unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True, timeout=20)
            self.mounted = False
