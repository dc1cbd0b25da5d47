"""Preemption signals, the stop watchdog, test-only fault hooks and the exit status of local ranks.

:class:`PreemptionExtension` is the first of the Trainer's extensions:

* **Signals.** ``train.preemption_signals`` (default SIGTERM and SIGUSR1, SLURM's requeue signal)
  and SIGINT (Ctrl-C) call ``trainer.request_stop``. The Trainer agrees on it across ranks in the
  step's loss all-reduce, so every rank stops after the same step; the extensions' ``on_stop`` save
  a checkpoint, the tracking run is closed and the process exits with code 4. A second Ctrl-C, a
  second or more after the first, aborts at once (exit 130).
* **Watchdog.** A rank that gets a stop signal but reaches no step boundary within
  ``max(distributed.timeout_s, 3 x its slowest step)`` (it is stuck) exits with code 1 instead of
  ignoring the signal until the launcher's SIGKILL.
* **Peers** (world size > 1): a :class:`dist_opt.peers.PeerMonitor` heartbeat names the missing
  ranks when a collective fails (:mod:`dist_opt.diagnose`) and ends a rank that is stuck outside a
  collective its peers reported as failed. A stop signal that arrives while a failed collective is
  being diagnosed, or just before (the launcher stops the ranks once one has died), ends that wait.
* **Test-only hooks**, read from the environment by tests/test_faults.py and never set in normal
  runs: ``DIST_OPT_TEST_HANG_AT_STEP=RANK:STEP`` makes that rank sleep forever after that step (a
  hung peer); ``DIST_OPT_TEST_STEP_SLEEP=SECONDS`` sleeps after every step (so that a test can
  signal a run in its middle); ``DIST_OPT_TEST_SLEEP_AFTER_EXIT_STATUS=SECONDS`` makes every rank sleep
  after it recorded its exit status (so that a test can signal a run that has just ended).

``spawn_ranks`` (dist_opt/train.py) asks the ranks for their exit codes through
``DIST_OPT_EXIT_STATUS_DIR`` (:func:`record_exit_status`, :func:`read_exit_statuses`): torchrun kills
the other ranks once one has exited, and a rank killed after it finished still counts with its code.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_opt.extensions import Extension
from dist_opt.peers import PeerMonitor

if TYPE_CHECKING:
    from dist_opt.config import Config
    from dist_opt.extensions import TrainerView

ENV_HANG = "DIST_OPT_TEST_HANG_AT_STEP"
ENV_STEP_SLEEP = "DIST_OPT_TEST_STEP_SLEEP"
ENV_EXIT_STATUS_DIR = "DIST_OPT_EXIT_STATUS_DIR"
ENV_SLEEP_AFTER_EXIT = "DIST_OPT_TEST_SLEEP_AFTER_EXIT_STATUS"
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
UNCATCHABLE = frozenset({"SIGKILL", "SIGSTOP"})

_ACTIVE: PreemptionExtension | None = None


def signal_by_name(name: str) -> signal.Signals:
    """``SIGTERM``, ``TERM`` or ``term`` -> :data:`signal.SIGTERM`; ValueError if unknown or uncatchable."""
    text = name.strip().upper()
    if not text.startswith("SIG"):
        text = "SIG" + text
    if text in UNCATCHABLE:
        raise ValueError(f"{text} cannot be caught")
    try:
        sig = signal.Signals[text]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}") from None
    return sig


class PreemptionExtension(Extension):
    """Stop on preemption signals at the next step boundary; watch peers and stuck ranks (module doc)."""

    name = "preemption"

    def __init__(self, cfg: Config, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        names = getattr(cfg.train, "preemption_signals", DEFAULT_SIGNALS)
        self.signals = sorted({signal_by_name(n) for n in names} | {signal.SIGINT})
        self.timeout_s = float(cfg.distributed.timeout_s)
        self.trainer: TrainerView | None = None
        self.signal_name: str | None = None
        self.signal_at: float | None = None
        self.stopping = False
        self._previous: dict[signal.Signals, Any] = {}
        self.monitor: PeerMonitor | None = None
        self._last_step_at: float | None = None
        self.slowest_step_s = 0.0
        self.hang_at = _parse_hang(env.get(ENV_HANG, ""))
        self.step_sleep = float(env.get(ENV_STEP_SLEEP, "0") or 0)

    # -- extension hooks -------------------------------------------------------------------------
    def setup(self, trainer: TrainerView) -> None:
        global _ACTIVE
        self.trainer = trainer
        self._install()
        self.monitor = PeerMonitor(
            trainer.rank,
            trainer.world,
            self.timeout_s,
            lambda: trainer.step,
            exit_process=self._exit_process,
            watchdog=self._watchdog,
        )
        self.monitor.start()
        self._last_step_at = time.monotonic()
        _ACTIVE = self

    def after_step(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        if self._last_step_at is not None:
            self.slowest_step_s = max(self.slowest_step_s, now - self._last_step_at)
        if self.hang_at is not None and self.hang_at == (trainer.rank, trainer.step):
            print(
                f"dist-opt: rank {trainer.rank}: {ENV_HANG}: hanging after step {trainer.step} (test hook)",
                file=sys.stderr,
                flush=True,
            )
            while True:
                time.sleep(3600)
        if self.step_sleep > 0:
            time.sleep(self.step_sleep)
        self._last_step_at = time.monotonic()

    def on_stop(self, trainer: TrainerView, reason: str) -> None:
        self.stopping = True
        if trainer.rank == 0:
            print(f"dist-opt: stopping after step {trainer.step}: {reason}", file=sys.stderr, flush=True)

    def finish(self, trainer: TrainerView) -> None:
        # the run is complete: signals get their previous handlers back, the monitor stops; a failure in
        # the remaining end-of-run work (e.g. the final checkpoint) is still explained (see release())
        if self.monitor is not None:
            self.monitor.stop()
        self._restore_signals()

    # -- signals ----------------------------------------------------------------------------------
    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except (ValueError, OSError):  # pragma: no cover - platform without this signal
                continue

    def _on_signal(self, signum: int, frame: Any) -> None:
        trainer = self.trainer
        now = time.monotonic()
        if trainer is None:
            return
        if self.monitor is not None:  # a failed collective's diagnosis (now or just after) does not wait
            self.monitor.hurry()
        if self.signal_at is None:
            self.signal_name, self.signal_at = signal.Signals(signum).name, now
            trainer.request_stop(f"received {self.signal_name}")
        elif signum == signal.SIGINT and now - self.signal_at >= 1.0 and not self.stopping:
            self.close()
            raise KeyboardInterrupt

    def watchdog_limit_s(self) -> float:
        """Seconds without a step boundary after a stop signal before this rank gives up."""
        return max(self.timeout_s, 3.0 * self.slowest_step_s)

    def _watchdog(self, now: float) -> str | None:
        """Why this rank must exit now (a stop signal and no step boundary since), or None."""
        t = self.trainer
        if self.signal_at is None or self.stopping or t is None or t.step >= t.total_steps:
            return None
        if now - max(self.signal_at, self._last_step_at or 0.0) <= self.watchdog_limit_s():
            return None
        return (
            f"received {self.signal_name} but reached no step boundary within "
            f"{self.watchdog_limit_s():.0f}s; exiting without a checkpoint"
        )

    def _exit_process(self, why: str) -> None:
        rank = self.trainer.rank if self.trainer is not None else 0
        record_exit_status(rank, 1)
        os._exit(1)

    def _restore_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, old in self._previous.items():
                try:
                    signal.signal(sig, old if old is not None else signal.SIG_DFL)
                except (ValueError, OSError):  # pragma: no cover
                    pass
            self._previous.clear()

    def close(self) -> None:
        """Stop the monitor and restore the previous signal handlers (idempotent)."""
        global _ACTIVE
        if self.monitor is not None:
            self.monitor.stop()
        self._restore_signals()
        if _ACTIVE is self:
            _ACTIVE = None


def _parse_hang(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    rank, _, step = text.partition(":")
    try:
        return int(rank), int(step)
    except ValueError:
        raise ValueError(f"{ENV_HANG}={text!r}: expected RANK:STEP") from None


def active() -> PreemptionExtension | None:
    """The extension of the run in progress in this process (None outside a run)."""
    return _ACTIVE


def release() -> None:
    """Undo what an active :class:`PreemptionExtension` installed (the run is over, whatever its end)."""
    if _ACTIVE is not None:
        _ACTIVE.close()


# -- exit status of local ranks (for the launcher process) ---------------------------------------------------
def record_exit_status(rank: int, code: int) -> int:
    """Leave ``code`` where :func:`read_exit_statuses` finds it (when the launcher asked for it)."""
    folder = os.environ.get(ENV_EXIT_STATUS_DIR)
    if folder:
        try:
            Path(folder, f"rank{rank}").write_text(str(code), encoding="utf-8")
        except OSError:
            pass
    pause = float(os.environ.get(ENV_SLEEP_AFTER_EXIT, "0") or 0)
    if pause > 0:  # test-only (module docstring)
        line = (
            f"dist-opt: test hook: rank {rank} (pid {os.getpid()}) recorded exit status {code}; "
            f"sleeping {pause:g}s\n"
        )
        sys.stderr.flush()
        os.write(2, line.encode())  # one write: the ranks share the launcher's stderr pipe
        time.sleep(pause)
    return code


def read_exit_statuses(folder: str | os.PathLike) -> dict[int, int]:
    out = {}
    for p in Path(folder).glob("rank*"):
        try:
            out[int(p.name[4:])] = int(p.read_text(encoding="utf-8"))
        except ValueError:
            continue
    return out
