"""Who is missing when a collective fails: heartbeats and failure reports through the group's store.

Every rank runs a :class:`PeerMonitor` thread (world size > 1). It writes a heartbeat
(``<step> <counter> <unix time>``) into the key-value store of the default process group every
``interval`` seconds, and watches a shared failure counter. The store is a separate TCP
connection (torchrun's agent hosts it; otherwise rank 0), so it still answers when a gloo/NCCL
collective is stuck.

When a collective fails on a rank, :meth:`PeerMonitor.post_mortem` reports it (collective and
step), waits up to ``grace`` seconds for the other ranks' reports and names the ranks that did not
report: *alive* (their heartbeat counter moved during the wait: the process runs but is not in the
collective, i.e. hung) or *not responding* (no heartbeat: dead, killed or unreachable; the message
says how long ago its last heartbeat was written). :meth:`PeerMonitor.hurry` cuts that wait short:
the launcher stops the remaining ranks (SIGTERM) once one has died, and a rank that is told to stop
during the wait, or at most ``HURRY_WINDOW_S`` before it, exits at once with what it knows instead
of waiting out the grace period.

A rank that has not reported while its peers have (it is not in the collective: stuck somewhere
else) exits after ``grace + interval`` seconds instead of waiting for a collective that can never
complete. The same thread runs the caller's watchdog (``watchdog(now)`` returns a reason to exit).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

KEY_PREFIX = "dist_opt/peers"
HURRY_WINDOW_S = 5.0  # a stop request this recent is about the failure at hand (the launcher's reaction)


def default_store() -> Any | None:
    """The key-value store of the default process group (None when there is none)."""
    try:
        import torch.distributed as dist

        if not dist.is_initialized():
            return None
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - diagnostics only: no store means fewer details
        return None


class PeerMonitor:
    """Heartbeat + failure reports through the process group's store, plus a caller's watchdog."""

    def __init__(
        self,
        rank: int,
        world: int,
        timeout_s: float,
        current_step: Callable[[], int],
        exit_process: Callable[[str], None],
        watchdog: Callable[[float], str | None] | None = None,
        store: Any | None = None,
    ):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.current_step, self.exit_process, self.watchdog = current_step, exit_process, watchdog
        self.interval = min(10.0, max(1.0, timeout_s / 10))
        self.grace = min(timeout_s, max(3.0, 2.5 * self.interval))
        self.store = (store or default_store()) if world > 1 else None
        self.prefix = KEY_PREFIX
        self.beats = 0
        self.reported = False
        self._stop = threading.Event()
        self._hurry = threading.Event()
        self._hurried_at = 0.0
        if self.store is not None:
            try:  # every rank counts the runs it started on this group: the same number on all ranks
                gen = self.store.add(f"{KEY_PREFIX}/runs/{rank}", 1)
                self.prefix = f"{KEY_PREFIX}/{gen}"
                self._beat()
            except Exception:  # noqa: BLE001
                self.store = None

    def _hb_key(self, rank: int) -> str:
        return f"{self.prefix}/hb/{rank}"

    def _report_key(self, rank: int) -> str:
        return f"{self.prefix}/report/{rank}"

    @property
    def _count_key(self) -> str:
        return f"{self.prefix}/failures"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dist-opt-peer-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop and join the heartbeat thread, so no store call is in flight when the process group
        (and its store) is torn down: a C++ store call cut off at teardown aborts the process."""
        self._stop.set()
        t = getattr(self, "_thread", None)
        if t is not None and t is not threading.current_thread():
            t.join(timeout=self.interval + 5.0)

    def hurry(self) -> None:
        """This rank is being stopped: end a :meth:`post_mortem` wait now, or one that starts within
        ``HURRY_WINDOW_S`` (a failure found after a stop request that old waits in full)."""
        self._hurried_at = time.monotonic()
        self._hurry.set()

    def _live_store(self) -> Any:
        """The store; raises when it is gone (every caller handles the error as a lost store)."""
        store = self.store
        if store is None:
            raise RuntimeError("the process group's key-value store is gone")
        return store

    def _beat(self) -> None:
        self.beats += 1
        beat = f"{self.current_step()} {self.beats} {time.time():.3f}"
        self._live_store().set(self._hb_key(self.rank), beat)

    def _loop(self) -> None:
        peers_failed_at: float | None = None
        while not self._stop.wait(self.interval if self.store is not None else 0.5):
            now = time.monotonic()
            why = self.watchdog(now) if self.watchdog is not None else None
            if why:
                self._exit(why)
            if self.store is None:
                continue
            try:
                self._beat()
                failures = int(self.store.add(self._count_key, 0))
            except Exception:  # noqa: BLE001 - the store is gone (its host exited): nothing to watch
                self.store = None
                continue
            if failures and not self.reported:
                if peers_failed_at is None:
                    peers_failed_at = now
                elif now - peers_failed_at > self.grace + self.interval + 1.0:
                    self._exit(
                        f"{self._reports_text()}, while this rank was not in it (stuck after step "
                        f"{self.current_step()}); exiting"
                    )

    def _exit(self, why: str) -> None:
        if self._stop.is_set():
            return
        print(f"dist-opt: rank {self.rank}: {why}", file=sys.stderr, flush=True)
        self.exit_process(why)

    def _reports(self) -> dict[int, dict]:
        store = self._live_store()
        out = {}
        for r in range(self.world):
            k = self._report_key(r)
            if store.check([k]):
                try:
                    out[r] = json.loads(store.get(k).decode())
                except (ValueError, UnicodeDecodeError):
                    out[r] = {}
        return out

    def _reports_text(self) -> str:
        try:
            reports = self._reports()
        except Exception:  # noqa: BLE001
            return "peer ranks reported a failed collective"
        by_what: dict[str, list[int]] = {}
        for r, v in sorted(reports.items()):
            by_what.setdefault(f"{v.get('collective', '?')} after step {v.get('step', '?')}", []).append(r)
        return "; ".join(
            f"rank(s) {', '.join(map(str, ranks))} reported a failed {what}"
            for what, ranks in by_what.items()
        )

    def _heartbeats(self) -> dict[int, tuple[int, int, float]]:
        """rank -> (step, counter, unix time) of its last heartbeat."""
        store = self._live_store()
        out = {}
        for r in range(self.world):
            k = self._hb_key(r)
            if store.check([k]):
                step, n, at = store.get(k).decode().split(" ")
                out[r] = (int(step), int(n), float(at))
        return out

    def post_mortem(self, collective: str, step: int) -> str:
        """Report this rank's failure, wait up to ``grace`` for the others, and say who is missing."""
        self.reported = True
        self.stop()
        if self.store is None:
            return ""
        if time.monotonic() - self._hurried_at > HURRY_WINDOW_S:
            self._hurry.clear()
        result: list[str] = []

        def work() -> None:
            store = self._live_store()
            store.set(self._report_key(self.rank), json.dumps({"collective": collective, "step": step}))
            store.add(self._count_key, 1)
            before = self._heartbeats()
            deadline = time.monotonic() + self.grace
            reports: dict[int, dict] = {}
            while time.monotonic() < deadline:
                reports = self._reports()
                if len(reports) == self.world or self._hurry.wait(0.2):
                    break
            after = self._heartbeats()
            missing = [r for r in range(self.world) if r not in reports]
            alive, dead = [], []
            for r in missing:
                b, a = before.get(r), after.get(r)
                if a is not None and b is not None and a[1] != b[1]:
                    alive.append(f"rank {r} is alive but did not join (hung after step {a[0]})")
                else:
                    dead.append(f"rank {r} is not responding (dead or unreachable{_silence(a)})")
            if missing:
                result.append("missing: " + ", ".join(alive + dead))
            else:
                result.append("every rank reported the failure (no rank missing)")
            others = [r for r in reports if r != self.rank]
            if others:
                result.append(f"same failure on rank(s) {', '.join(map(str, sorted(others)))}")

        t = threading.Thread(target=work, daemon=True)  # store calls can block: bounded by join
        t.start()
        t.join(self.grace + 5.0)
        if t.is_alive():
            return "the key-value store did not answer (its host may be gone)"
        return "; ".join(result)


def _silence(beat: tuple[int, int, float] | None) -> str:
    """How long ago a silent rank's last heartbeat was written (its clock against this rank's)."""
    if beat is None:
        return "; it never sent a heartbeat"
    return f"; last heartbeat {max(0.0, time.time() - beat[2]):.1f} s ago"
