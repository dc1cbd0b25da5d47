"""Start a plan's commands, stream their output, and end the launch as one unit.

The first command that exits non-zero (or cannot be started, or an ssh that cannot connect)
ends the launch: the failure is reported naming the node, every other command is terminated
(SIGTERM to its process group, SIGKILL after a grace period; remote ranks die with their ssh),
and the launcher exits non-zero. An optional overall timeout bounds everything.

A stop request (SIGTERM or Ctrl-C to the launcher, or a node that exits with code 4 after its
ranks saved) is a preemption: every node gets SIGTERM (remote nodes through their shim), the
launcher waits up to ``stop_grace`` seconds for the ranks to save, and exits with the code every
rank recorded (4: stopped and saved; ranks record it in ``DIST_OPT_EXIT_STATUS_DIR``, which the
launcher sets), else 130. Helper launchers such as torchrun exit 1 after a forwarded signal
whatever their ranks did; the ranks' recorded outcome is what counts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TextIO

from dist_opt.dist.lifeline import die_with_parent
from dist_opt.faults import ENV_EXIT_STATUS_DIR, read_exit_statuses
from dist_opt.launch.errors import LaunchFailure
from dist_opt.launch.plan import Plan, Proc, SshOptions
from dist_opt.launch.ssh import check_reachable, remote_command, ssh_argv

POLL_S = 0.1
EXIT_STOPPED = 4  # ranks stopped on a signal and saved (dist_opt.outcome)
STOP_LINE = b"TERM\n"  # on a remote node's stdin: SIGTERM to its ranks (dist_opt.launch.remote)


@dataclass
class _Running:
    proc: Proc
    popen: subprocess.Popen
    tail: deque = field(default_factory=lambda: deque(maxlen=20))
    reader: threading.Thread | None = None


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_TELLING = re.compile(r"error|exception|exitcode|refused|in use|denied|timed out|killed|not found", re.I)


def _telling_lines(tail: deque, n: int = 2) -> list[str]:
    """The last lines that say what went wrong (errors, exit codes), else the last lines with words."""
    wordy = [ln.strip() for ln in tail if re.search(r"[A-Za-z]", ln)]
    telling = [ln for ln in wordy if _TELLING.search(ln)]
    return (telling or wordy)[-n:]


class Supervisor:
    """Runs one plan; :meth:`run` returns the launch's exit code."""

    def __init__(
        self,
        plan: Plan,
        ssh: SshOptions,
        python: str,
        cwd: str,
        timeout: float | None = None,
        grace: float = 5.0,
        out: TextIO | None = None,
        err: TextIO | None = None,
        stop_grace: float = 120.0,
    ):
        self.plan, self.ssh, self.python, self.cwd = plan, ssh, python, cwd
        self.timeout, self.grace, self.stop_grace = timeout, grace, stop_grace
        self._status_dir = ""
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._lock = threading.Lock()
        self._running: list[_Running] = []

    def say(self, message: str) -> None:
        with self._lock:
            print(f"dist-opt launch: {message}", file=self.err, flush=True)

    def _pump(self, run: _Running) -> None:
        assert run.popen.stdout is not None
        prefix = f"[{run.proc.label}] "
        for raw in iter(run.popen.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            run.tail.append(line)
            with self._lock:
                self.out.write(prefix + line + "\n")
                self.out.flush()

    def _start(self, proc: Proc) -> _Running:
        proc = Proc(
            proc.label,
            proc.host,
            proc.argv,
            {**proc.env, ENV_EXIT_STATUS_DIR: self._status_dir},
            proc.omp_ranks,
        )
        if proc.remote:
            assert proc.host is not None
            cmd = remote_command(self.python, self.cwd, proc.argv, pythonpath=proc.env.get("PYTHONPATH"))
            popen = subprocess.Popen(
                ssh_argv(proc.host, cmd, self.ssh),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            assert popen.stdin is not None
            header: dict[str, object] = {"env": proc.env}
            if proc.omp_ranks is not None:
                header["omp_ranks"] = proc.omp_ranks
            popen.stdin.write((json.dumps(header) + "\n").encode("utf-8"))
            popen.stdin.flush()  # stdin stays open: it is the remote side's lifeline
        else:
            popen = subprocess.Popen(
                proc.argv,
                env={**os.environ, **proc.env},
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,  # a SIGKILLed launcher takes its local children along
            )
        run = _Running(proc=proc, popen=popen)
        run.reader = threading.Thread(target=self._pump, args=(run,), daemon=True)
        run.reader.start()
        return run

    def _preflight(self) -> None:
        remote = [p for p in self.plan.procs if p.remote]
        if not remote or not self.ssh.check:
            return
        failed = check_reachable([str(p.host) for p in remote], self.ssh)
        if failed:
            for p in remote:
                if p.host in failed:
                    self.say(f"{p.label} is unreachable over ssh: {failed[p.host]}")
            raise LaunchFailure(f"{len(failed)} node(s) unreachable; nothing was started")

    def _stop_all(self) -> None:
        alive = [r for r in self._running if r.popen.poll() is None]
        for r in alive:
            if r.popen.stdin is not None:
                try:
                    r.popen.stdin.close()
                except OSError:
                    pass
            _signal_group(r.popen, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for r in alive:
            try:
                r.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for r in self._running:
            _signal_group(r.popen, signal.SIGKILL)  # also sweeps leftovers of finished groups
            try:
                r.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for r in self._running:
            if r.reader is not None:
                r.reader.join(timeout=2)

    def _outcome(self) -> int | None:
        """The exit code every rank recorded (the same one on all of them), else None."""
        codes = read_exit_statuses(self._status_dir) if self._status_dir else {}
        if len(codes) != self.plan.world_size or len(set(codes.values())) != 1:
            return None
        return next(iter(codes.values()))

    def _stop_for_preemption(self) -> int:
        """SIGTERM to every node, wait up to ``stop_grace`` for the ranks to save; their outcome or 130."""
        for r in self._running:
            if r.popen.poll() is not None:
                continue
            if r.proc.remote and r.popen.stdin is not None:
                try:
                    r.popen.stdin.write(STOP_LINE)
                    r.popen.stdin.flush()
                except OSError:
                    pass
            else:
                _signal_group(r.popen, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        for r in self._running:
            try:
                r.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        outcome = self._outcome()
        if outcome is None:
            return 130
        self.say(
            f"every rank ended with exit code {outcome}"
            + (" (stopped and saved)" if outcome == EXIT_STOPPED else "")
        )
        return outcome

    def _describe_failure(self, run: _Running, rc: int) -> str:
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
        if run.proc.remote and rc == 255:
            how += " (ssh could not run the command on that node)"
        last = _telling_lines(run.tail)
        detail = "; last output: " + " | ".join(last) if last else ""
        return f"{run.proc.label} {how}{detail}"

    def _watch(self) -> int:
        start = time.monotonic()
        while True:
            pending = False
            for r in self._running:
                rc = r.popen.poll()
                if rc is None:
                    pending = True
                elif rc != 0:
                    if r.reader is not None:
                        r.reader.join(timeout=1)
                    outcome = self._outcome()
                    if outcome == EXIT_STOPPED or rc == EXIT_STOPPED:  # stopped on a signal: let all save
                        self.say(f"{r.proc.label} stopped (its ranks saved); stopping the other nodes")
                        return self._stop_for_preemption()
                    self.say(self._describe_failure(r, rc) + "; stopping the other nodes")
                    return rc if 0 < rc < 128 and not (r.proc.remote and rc == 255) else 1
            if not pending:
                return 0
            if self.timeout is not None and time.monotonic() - start > self.timeout:
                waiting = ", ".join(r.proc.label for r in self._running if r.popen.poll() is None)
                self.say(f"timed out after {self.timeout:g} s; still running: {waiting}; stopping them")
                return 124
            time.sleep(POLL_S)

    def run(self) -> int:
        self._preflight()
        self._status_dir = tempfile.mkdtemp(prefix="dist-opt-launch-exit-")
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, _frame: object) -> None:
            raise KeyboardInterrupt

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_term)
        try:
            for proc in self.plan.procs:
                try:
                    self._running.append(self._start(proc))
                except OSError as e:
                    self.say(f"{proc.label}: cannot start {proc.argv[0]!r}: {e}; stopping the other nodes")
                    return 1
            return self._watch()
        except KeyboardInterrupt:
            self.say("interrupted; stopping every node (they save and stop; again to abort)")
            try:
                return self._stop_for_preemption()
            except KeyboardInterrupt:
                return 130
        finally:
            self._stop_all()
            shutil.rmtree(self._status_dir, ignore_errors=True)
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, previous)
