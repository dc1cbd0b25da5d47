"""Real gloo process groups for tests: N ranks spawned once, reused for many calls.

Each worker joins a gloo group through a file rendezvous (no ports) with a process-group
timeout, then runs ``fn(rank, world, *args)`` for every submitted call and sends back the
result or the formatted traceback. A call that does not finish within ``call_timeout`` kills
the workers (and the next call starts fresh ones) instead of hanging the suite.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import subprocess
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

PG_TIMEOUT_S = 60


def _worker(rank: int, world: int, init_file: str, inbox, outbox) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=PG_TIMEOUT_S),
    )
    while True:
        item = inbox.get()
        if item is None:
            break
        call_id, fn, args = item
        try:
            outbox.put((call_id, rank, True, fn(rank, world, *args)))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            outbox.put((call_id, rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistHarness:
    def __init__(self, world: int, call_timeout: float = 120.0):
        self.world, self.call_timeout = world, call_timeout
        self._procs: list = []
        self._calls = 0

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._tmp = tempfile.TemporaryDirectory()
        init_file = os.path.join(self._tmp.name, "rendezvous")
        self._inboxes = [ctx.Queue() for _ in range(self.world)]
        self._outbox = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker, args=(r, self.world, init_file, self._inboxes[r], self._outbox), daemon=True
            )
            for r in range(self.world)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Run ``fn(rank, world, *args)`` on every rank; results in rank order."""
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        self._calls += 1
        call_id = self._calls
        for box in self._inboxes:
            box.put((call_id, fn, args))
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        while len(results) + len(errors) < self.world:
            try:
                cid, rank, ok, value = self._outbox.get(timeout=self.call_timeout)
            except queue.Empty:
                self.close()
                raise TimeoutError(
                    f"{fn.__name__}: no answer from ranks "
                    f"{sorted(set(range(self.world)) - set(results) - set(errors))} "
                    f"within {self.call_timeout}s; errors so far: {errors}"
                ) from None
            if cid != call_id:
                continue
            (results if ok else errors)[rank] = value
            if errors and len(results) + len(errors) < self.world:
                # other ranks may be stuck in a collective the failed rank never joined
                self.close()
                break
        if errors:
            self.close()
            msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise RuntimeError(f"{fn.__name__} failed on rank(s) {sorted(errors)}:\n{msg}")
        return [results[r] for r in range(self.world)]

    def close(self) -> None:
        for box in getattr(self, "_inboxes", []):
            try:
                box.put(None)
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []
        if getattr(self, "_tmp", None):
            self._tmp.cleanup()
            self._tmp = None


def run_ok(cmd: list[str], *, timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a real command (output captured as text); fail the test with its output's tail unless it
    exits 0."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc
