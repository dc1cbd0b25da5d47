"""A process whose launcher is killed with SIGKILL stops by itself within the bound (real processes)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import signal, sys, time
    from dist_opt.dist.lifeline import watch_parent
    stopped = []
    signal.signal(signal.SIGTERM, lambda *a: stopped.append(time.time()) or open(sys.argv[1], "w").write("stop"))
    watch_parent(grace_s=2.0, poll_s=0.2)
    open(sys.argv[2], "w").write("ready")
    while True:
        time.sleep(0.1)
""")

PARENT = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]])
    print(child.pid, flush=True)
    time.sleep(600)
""")


def _wait_for(path: Path, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its new parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-pid watch is tested on Linux")
def test_orphaned_process_asks_to_stop_then_exits_within_bound(tmp_path):
    stop_file, ready = tmp_path / "stop", tmp_path / "ready"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD, str(stop_file), str(ready)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    child_pid = int(parent.stdout.readline())
    assert _wait_for(ready, 60), "child never started"
    t0 = time.time()
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert _wait_for(stop_file, 5), "the orphan did not ask itself to stop"
    while _alive(child_pid) and time.time() - t0 < 10:
        time.sleep(0.1)
    assert not _alive(child_pid), "the orphan outlived its launcher by 10 s"
    assert time.time() - t0 >= 2.0  # it gave the stop request its grace period first


def test_no_watch_without_a_parent_to_watch():
    code = (
        "import os; from dist_opt.dist import lifeline; os.getppid = lambda: 1; "
        "print(lifeline.watch_parent())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=60,
    )
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_die_with_parent_signals_the_child(tmp_path):
    marker = tmp_path / "got_term"
    child = textwrap.dedent(f"""
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, "w").write("x"), sys.exit(0)))
        print("ready", flush=True)
        time.sleep(60)
    """)
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        from dist_opt.dist.lifeline import die_with_parent
        c = subprocess.Popen([sys.executable, "-c", {child!r}], preexec_fn=die_with_parent, stdout=subprocess.PIPE, text=True)
        c.stdout.readline()
        print("ready", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen(
        [sys.executable, "-c", parent],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert p.stdout.readline().strip() == "ready"
    p.kill()
    p.wait()
    assert _wait_for(marker, 10)
