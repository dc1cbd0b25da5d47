"""Node-side shim: ``python -m dist_opt.launch.remote -- ARGV...`` started over ssh by the launcher.

Reads one JSON line ``{"env": {...}, "omp_ranks": N}`` from stdin, runs ARGV with that environment
added (and, with ``omp_ranks``, OMP_NUM_THREADS = this node's usable cores // N unless the
environment sets it: each node counts its own cores), in its own session, and keeps reading stdin:
a line ``TERM`` sends SIGTERM to the session (the launcher stops the run; the ranks save and exit),
end-of-file means the launcher (or its ssh) is gone, and then the whole session is terminated, so
no rank outlives a failed or interrupted launch.
Exits with ARGV's exit code (128 + signal number when it was killed by a signal).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

from dist_opt.launch.envvars import omp_threads, usable_cores

GRACE_S = 5.0


def _kill_session(proc: subprocess.Popen, grace: float = GRACE_S) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=grace)
            if sig == signal.SIGTERM:
                try:  # the leader is gone; sweep what is left of its session
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            return
        except subprocess.TimeoutExpired:
            continue


def _read_line(fd: int, limit: int = 1 << 20) -> bytes:
    """One line from a raw fd, byte by byte, so nothing after it is buffered away from the lifeline."""
    buf = bytearray()
    while len(buf) < limit:
        ch = os.read(fd, 1)
        if not ch or ch == b"\n":
            return bytes(buf)
        buf += ch
    raise ValueError("header line on stdin is too long")


def header_env(header: dict, cores: int) -> dict[str, str]:
    """The variables a header adds: its ``env``, plus OMP_NUM_THREADS from ``cores`` for ``omp_ranks``."""
    env = header.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise ValueError("header 'env' must map names to strings")
    ranks = header.get("omp_ranks")
    if ranks is not None:
        if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks <= 0:
            raise ValueError("header 'omp_ranks' must be a positive integer")
        if "OMP_NUM_THREADS" not in env:
            env = {**env, "OMP_NUM_THREADS": str(omp_threads(cores, ranks))}
    return env


def _read_header(fd: int) -> dict[str, str]:
    line = _read_line(fd)
    if not line.strip():
        raise ValueError("no header on stdin (expected one JSON line with 'env')")
    header = json.loads(line)
    if not isinstance(header, dict):
        raise ValueError("the header must be a JSON object")
    return header_env(header, usable_cores())


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(
            "dist_opt.launch.remote: usage: python -m dist_opt.launch.remote -- COMMAND [ARGS...]",
            file=sys.stderr,
        )
        return 2
    stdin = sys.stdin.fileno()
    try:
        extra = _read_header(stdin)
    except ValueError as e:
        print(f"dist_opt.launch.remote: {e}", file=sys.stderr)
        return 2
    try:
        proc = subprocess.Popen(
            argv, env={**os.environ, **extra}, stdin=subprocess.DEVNULL, start_new_session=True
        )
    except OSError as e:
        print(f"dist_opt.launch.remote: cannot start {argv[0]!r}: {e}", file=sys.stderr)
        return 127

    def lifeline() -> None:
        try:
            while data := os.read(stdin, 4096):  # raw reads: no buffer lock to trip over at shutdown
                if b"TERM" in data:  # the launcher stops the run: the ranks save and exit
                    try:
                        os.killpg(proc.pid, signal.SIGTERM)
                    except (ProcessLookupError, PermissionError):
                        pass
        except OSError:
            pass
        _kill_session(proc)

    threading.Thread(target=lifeline, daemon=True).start()

    def on_signal(signum: int, _frame: object) -> None:  # no blocking in a handler: escalate in a thread
        threading.Thread(target=_kill_session, args=(proc,), daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)
    rc = proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of a finished command
    except (ProcessLookupError, PermissionError):
        pass
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
