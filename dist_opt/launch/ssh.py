"""ssh command lines for remote nodes. Everything a user typed is an argv item or shlex-quoted.

A remote node runs ``cd CWD && exec PYTHON -m dist_opt.launch.remote -- ARGV...``; the environment
travels on ssh's stdin (never on a command line, where ``ps`` would show secrets), and the
open stdin doubles as a lifeline: when the launcher goes away the remote side kills its ranks.
"""

from __future__ import annotations

import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor

from dist_opt.launch.plan import SshOptions


def ssh_argv(host: str, remote_command: str, opts: SshOptions) -> list[str]:
    """The local argv that runs ``remote_command`` (one shell string) on ``host``."""
    argv = [
        "ssh",
        "-T",
        "-o",
        "BatchMode=yes",
        "-o",
        f"ConnectTimeout={opts.connect_timeout}",
        "-o",
        "ServerAliveInterval=15",
        "-o",
        "ServerAliveCountMax=4",
    ]
    if opts.config:
        argv += ["-F", opts.config]
    if opts.port is not None:
        argv += ["-p", str(opts.port)]
    for opt in opts.options:
        argv += ["-o", opt]
    return [*argv, "--", host, remote_command]


def remote_command(python: str, cwd: str, argv: list[str], pythonpath: str | None = None) -> str:
    """Shell string for the remote login shell: change directory, then exec the node shim."""
    shim = [python, "-m", "dist_opt.launch.remote", "--", *argv]
    if pythonpath:
        shim = ["env", f"PYTHONPATH={pythonpath}", *shim]
    return f"cd {shlex.quote(cwd)} && exec {shlex.join(shim)}"


def check_reachable(hosts: list[str], opts: SshOptions) -> dict[str, str]:
    """Run ``true`` on every host in parallel; returns {host: error} for the ones that failed."""

    def probe(host: str) -> tuple[str, str | None]:
        try:
            done = subprocess.run(
                ssh_argv(host, "true", opts),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=opts.connect_timeout + 20,
            )
        except subprocess.TimeoutExpired:
            return host, f"ssh did not finish within {opts.connect_timeout + 20} s"
        except OSError as e:
            return host, f"cannot run ssh: {e}"
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
            return host, lines[-1] if lines else f"ssh exited with code {done.returncode}"
        return host, None

    if not hosts:
        return {}
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        results = list(pool.map(probe, hosts))
    return {host: err for host, err in results if err is not None}
