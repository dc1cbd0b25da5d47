"""Ranks never outlive their launcher.

A launcher killed with SIGKILL cannot forward anything to its ranks, and the kernel re-parents
them (to init or a subreaper) where they would keep training, and writing into the run
directory, beside a restarted run. :func:`watch_parent` starts a daemon thread that notices the
re-parenting (the parent pid changes) within ``poll_s``; it then asks the rank to stop
(``on_orphan``, by default SIGTERM to itself, which the preemption handling turns into an agreed
stop with a checkpoint at the next step boundary) and ends the process ``grace_s`` later whatever
happens (a checkpoint still being written is harmless: a folder without its completion marker is
never resumed from).

:func:`die_with_parent` is the ``preexec_fn`` a launcher gives to a child it starts (e.g. torchrun):
Linux's parent-death signal then ends the child when the launcher dies, so a whole chain
launcher -> torchrun -> ranks unwinds.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
DEFAULT_GRACE_S = 8.0
DEFAULT_POLL_S = 0.5
EXIT_ORPHANED = 1

_started = False


def _stop_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def watch_parent(
    on_orphan: Callable[[], None] | None = None,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    poll_s: float = DEFAULT_POLL_S,
    label: str = "dist-opt",
) -> bool:
    """Start the watch (once per process). Returns False when there is no parent to watch
    (already orphaned, or started directly by init)."""
    global _started
    parent = os.getppid()
    if _started or parent <= 1:
        return False
    _started = True
    stop = on_orphan or _stop_self

    def loop() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"{label}: the launching process (pid {parent}) is gone; stopping this rank "
              f"(exit within {grace_s:g} s)", file=sys.stderr, flush=True)
        try:
            stop()
        finally:
            time.sleep(grace_s)
            os._exit(EXIT_ORPHANED)

    threading.Thread(target=loop, name="dist-opt-parent-watch", daemon=True).start()
    return True


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (no-op elsewhere).

    Meant as ``subprocess.Popen(..., preexec_fn=die_with_parent)`` in a launcher that spawns from
    its main thread (the signal fires when the spawning *thread* ends)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
