"""A throw-away multi-host network for tests: network namespaces joined by a bridge, one sshd each.

Layout (``tok`` is random so parallel runs do not collide)::

    root namespace (the test, the launcher)        switch namespace            node namespaces
    dot<tok>h 10.213.S.254/24  ── veth ──  dot<tok>s ─┐                     ┌─ eth0 10.213.S.1  sshd
                                                     br0 ── veth ─────────┤
                                                                           └─ eth0 10.213.S.2  sshd

The bridge lives in its own namespace so that the host's firewall (br_netfilter, a FORWARD
policy of DROP on Docker hosts) never sees the bridged traffic. Every node has its own hostname
(``dot-nodeI``, in a UTS namespace of its own) and runs a real OpenSSH server bound only to its
own address, with a generated host key; the client side
gets a generated user key, a ``known_hosts`` with the real host key, and an ``ssh_config``
with ``StrictHostKeyChecking yes`` and ``BatchMode yes``. The filesystem is shared (namespaces
only separate the network), so the venv and the repository have the same paths on every node.

Needs root, ``ip netns`` and ``/usr/sbin/sshd`` (Debian ``openssh-server``; :func:`ensure_sshd`
installs it with apt-get when missing).
"""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def unavailable_reason() -> str | None:
    """Why the namespace cluster cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "multi-node test needs root (network namespaces and sshd)"
    if shutil.which("ip") is None:
        return "multi-node test needs iproute2 (`ip netns`), which is not installed"
    probe = f"dotprobe{secrets.token_hex(3)}"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns` is unavailable here: {made.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def ensure_sshd() -> None:
    """Install Debian's openssh-server when /usr/sbin/sshd is missing (needs root and apt)."""
    if os.path.exists(SSHD):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", "openssh-server"],
        check=False,
        capture_output=True,
        env=env,
        timeout=600,
    )
    if not os.path.exists(SSHD):
        subprocess.run(["apt-get", "update"], check=False, capture_output=True, env=env, timeout=600)
        done = subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "openssh-server"],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        if not os.path.exists(SSHD):
            raise RuntimeError(f"could not install openssh-server: {done.stderr.strip()[-500:]}")


def _free_subnet() -> str:
    """A 10.213.S.0/24 prefix not used by any address in the root namespace."""
    used = _ip("-4", "-o", "addr").stdout + _ip("-4", "route").stdout
    for _ in range(50):
        prefix = f"10.213.{secrets.randbelow(250) + 1}"
        if f"{prefix}." not in used:
            return prefix
    raise RuntimeError("no free 10.213.x.0/24 subnet")


@dataclass
class Node:
    netns: str
    addr: str
    sshd: subprocess.Popen | None = None


@dataclass
class Cluster:
    """``n`` namespace "nodes", each with an address and an sshd; use as a context manager."""

    n: int
    workdir: Path
    tok: str = field(default_factory=lambda: secrets.token_hex(2))
    nodes: list[Node] = field(default_factory=list)
    prefix: str = ""

    @property
    def switch(self) -> str:
        return f"dot{self.tok}sw"

    @property
    def host_if(self) -> str:
        return f"dot{self.tok}h"

    @property
    def host_addr(self) -> str:
        return f"{self.prefix}.254"

    @property
    def ssh_config(self) -> Path:
        return self.workdir / "ssh_config"

    def unused_addr(self) -> str:
        """An address inside the cluster subnet that no node has (for unreachable-host tests)."""
        return f"{self.prefix}.200"

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prefix = _free_subnet()
        self._network()
        self._etc()
        self._keys()
        for i, node in enumerate(self.nodes):
            self._start_sshd(i, node)
        for node in self.nodes:
            self._wait_ssh(node)

    def _network(self) -> None:
        sw = self.switch
        _ip("netns", "add", sw)
        _ip("-n", sw, "link", "set", "lo", "up")
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        # root namespace <-> switch
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", f"dot{self.tok}s", "netns", sw)
        _ip("-n", sw, "link", "set", f"dot{self.tok}s", "master", "br0", "up")
        _ip("addr", "add", f"{self.host_addr}/24", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        for i in range(self.n):
            ns = f"dot{self.tok}n{i}"
            _ip("netns", "add", ns)
            self.nodes.append(Node(netns=ns, addr=f"{self.prefix}.{i + 1}"))  # before anything can fail
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", sw, "link", "add", f"n{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", sw, "link", "set", f"n{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.prefix}.{i + 1}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def _etc(self) -> None:
        """Per-namespace /etc/hosts and resolv.conf (``ip netns exec`` bind-mounts /etc/netns/NS/*).

        Each node has its own hostname (``dot-nodeI``, see :meth:`_start_sshd`) that resolves to its
        own address, as on a real cluster, and every node name resolves without DNS: lookups inside
        a namespace cannot reach the host's name server, and waiting for it would stall every
        connection gloo makes. The machine's own hostname still resolves to the node's address.
        """
        me = socket.gethostname()
        names = "".join(f"{n.addr} {node_hostname(i)}\n" for i, n in enumerate(self.nodes))
        for node in self.nodes:
            etc = Path("/etc/netns") / node.netns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{node.addr} {me}\n{names}")
            (etc / "resolv.conf").write_text(
                "# no name server inside the test namespace\noptions timeout:1 attempts:1\n"
            )

    def _keys(self) -> None:
        w = self.workdir
        for name in ("host_ed25519", "id_ed25519"):
            for old in (w / name, w / f"{name}.pub"):
                old.unlink(missing_ok=True)
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dist-opt-test", "-f", str(w / name)],
                check=True,
                capture_output=True,
                timeout=30,
            )
        (w / "authorized_keys").write_text((w / "id_ed25519.pub").read_text())
        host_pub = (w / "host_ed25519.pub").read_text().split()
        (w / "known_hosts").write_text(
            "".join(f"{node.addr} {host_pub[0]} {host_pub[1]}\n" for node in self.nodes)
        )
        self.ssh_config.write_text(
            "Host *\n"
            f"  User {getpass.getuser()}\n"
            f"  IdentityFile {w / 'id_ed25519'}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {w / 'known_hosts'}\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n"
            "  BatchMode yes\n"
            "  ConnectTimeout 5\n"
            "  LogLevel ERROR\n"
        )

    def _start_sshd(self, i: int, node: Node) -> None:
        w = self.workdir
        cfg = w / f"sshd_{i}.conf"
        cfg.write_text(
            f"ListenAddress {node.addr}\n"
            "Port 22\n"
            f"HostKey {w / 'host_ed25519'}\n"
            f"PidFile {w / f'sshd_{i}.pid'}\n"
            f"AuthorizedKeysFile {w / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "MaxStartups 100\n"
            "LogLevel ERROR\n"
        )
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege-separation directory
        log = open(w / f"sshd_{i}.log", "wb")  # noqa: SIM115 - lives as long as the daemon
        # its own UTS namespace too: every node has a hostname of its own, as real nodes do (Open MPI
        # tells nodes apart by hostname; two nodes named alike hang its first message between them)
        daemon = f"hostname {node_hostname(i)} && exec {SSHD} -D -e -f {cfg}"
        node.sshd = subprocess.Popen(
            ["ip", "netns", "exec", node.netns, "unshare", "--uts", "sh", "-c", daemon],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def _wait_ssh(self, node: Node, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if node.sshd is not None and node.sshd.poll() is not None:
                break
            try:
                with socket.create_connection((node.addr, 22), timeout=1):
                    return
            except OSError as e:
                last = str(e)
                time.sleep(0.1)
        log = (self.workdir / f"sshd_{self.nodes.index(node)}.log").read_text(errors="replace")
        raise RuntimeError(f"sshd in {node.netns} ({node.addr}) did not come up: {last} {log[-500:]}")

    def ssh_argv(self, node: Node, *command: str) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), node.addr, *command]

    def hostfile(self, slots: int = 1, extra: str = "") -> Path:
        path = self.workdir / "hostfile"
        path.write_text(
            "# dist-opt test cluster\n" + "".join(f"{n.addr} slots={slots}\n" for n in self.nodes) + extra
        )
        return path

    def close(self) -> None:
        for node in self.nodes:
            if node.sshd is not None and node.sshd.poll() is None:
                node.sshd.terminate()
                try:
                    node.sshd.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    node.sshd.kill()
                    node.sshd.wait(timeout=5)
        for node in self.nodes:
            _kill_netns_pids(node.netns)
            _ip("netns", "del", node.netns, check=False)
            shutil.rmtree(Path("/etc/netns") / node.netns, ignore_errors=True)
        _ip("link", "del", self.host_if, check=False)
        _ip("netns", "del", self.switch, check=False)


def node_hostname(i: int) -> str:
    """The hostname of node ``i`` (its own UTS namespace); it resolves to the node's address."""
    return f"dot-node{i}"


def _kill_netns_pids(netns: str) -> None:
    """Kill what is still running inside a namespace (sessions left behind by a failed test)."""
    out = _ip("netns", "pids", netns, check=False).stdout.split()
    for pid in out:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass


# A tiny rank program for the launcher tests: joins the group the way dist_opt.train does
# (dist_opt.dist.env.detect + dist_opt.dist.group.init_process_group), all-reduces rank + 1,
# and writes what it saw to OUT/rank<R>.json. PROBE_DIE_RANK makes one rank exit 3 at start,
# PROBE_SLEEP makes every rank sleep first (for timeout tests).
PROBE_SOURCE = """
import json, os, sys, time
import torch
import torch.distributed as dist
from dist_opt.dist.env import detect
from dist_opt.dist.group import destroy_process_group, init_process_group

out = sys.argv[1]
env = detect(os.environ)
if os.environ.get("PROBE_DIE_RANK") == str(env.rank):
    print(f"rank {env.rank}: dying at start on purpose", flush=True)
    sys.exit(3)
time.sleep(float(os.environ.get("PROBE_SLEEP", "0")))
init_process_group(env, "gloo", timeout_s=60.0)
t = torch.tensor([float(env.rank + 1)])
dist.all_reduce(t)
record = {
    "rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item(), "launcher": env.launcher,
    "omp": os.environ.get("OMP_NUM_THREADS"), "extra": os.environ.get("PROBE_EXTRA"),
    "allowed": os.environ.get("DIST_OPT_PROBE_ALLOWED"), "private": os.environ.get("PROBE_PRIVATE"),
    "netns": os.readlink("/proc/self/ns/net"),
}
with open(os.path.join(out, f"rank{env.rank}.json"), "w") as f:
    json.dump(record, f)
destroy_process_group()
"""


def write_probe(directory: Path) -> Path:
    """Write the probe module as DIRECTORY/launch_probe.py; run it with ``--module launch_probe OUT``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "launch_probe.py"
    path.write_text(PROBE_SOURCE)
    return path
