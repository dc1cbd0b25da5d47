"""Multi-node launches over a real network: network namespaces as nodes, a real sshd in each.

``dist-opt launch --hostfile`` runs in the root namespace and reaches every node over ssh
(generated keys, strict host key checking against a generated known_hosts, BatchMode). The ranks
rendezvous over the namespace network and train together; the result equals one process.
Skipped only when not root or when ``ip netns`` is unavailable (a failure instead with
``DIST_OPT_REQUIRE_ALL_TESTS=1``, as in CI).

Each namespace node has a hostname of its own that resolves to its own address (per-namespace
UTS namespace and /etc/hosts, see tests/netns.py), as on a real cluster: gloo finds the right
interface by itself, and Open MPI (which tells nodes apart by hostname) can start ranks on both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import netns
import pytest
from environment import require_or_skip
from test_launch_run import REPO, TINY, assert_final_checkpoint, assert_same_run, launch_env, run_launch

REASON = netns.unavailable_reason()


@pytest.fixture(scope="module", autouse=True)
def _namespaces_available():
    """Runs before the module's other fixtures (autouse, module scope): no cluster is built without them."""
    if REASON is not None:
        require_or_skip(REASON)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    netns.ensure_sshd()
    with netns.Cluster(2, tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    done = subprocess.run(
        [sys.executable, "-m", "dist_opt.train", str(tiny), "distributed.nproc=1", f"run.out_dir={out}"],
        env=launch_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def cluster_args(c: netns.Cluster, hostfile: Path, *more: str) -> list[str]:
    return ["--hostfile", str(hostfile), "--ssh-config", str(c.ssh_config), "--timeout", "150", *more]


@pytest.fixture
def probe(tmp_path):
    mods = tmp_path / "mods"
    netns.write_probe(mods)
    out = tmp_path / "out"
    out.mkdir()
    return mods, out


def leftovers(node: netns.Node, marker: str) -> list[str]:
    """Command lines of processes inside ``node``'s namespace that mention ``marker``."""
    pids = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True).stdout.split()
    found = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            found.append(cmd)
    return found


@pytest.mark.timeout(180)
def test_ranks_on_two_nodes_rendezvous_over_the_namespace_network(cluster, probe):
    mods, out = probe
    env = launch_env(mods)
    env.update(DIST_OPT_PROBE_ALLOWED="yes", PROBE_PRIVATE="must-not-travel")
    done = run_launch(
        cluster_args(
            cluster,
            cluster.hostfile(slots=1),
            "--module",
            "launch_probe",
            "--cores-per-node",
            "2",
            "--env",
            "PROBE_EXTRA=x y",
            str(out),
        ),
        env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in records)
    # each rank ran in its own node's network namespace, not in the launcher's
    own = os.readlink("/proc/self/ns/net")
    assert len({r["netns"] for r in records}) == 2 and own not in {r["netns"] for r in records}
    for r in records:
        assert r["extra"] == "x y" and r["allowed"] == "yes" and r["private"] is None and r["omp"] == "2"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "mpirun"])
def test_two_nodes_train_to_the_single_process_parameters(launcher, cluster, tiny, reference, tmp_path):
    out = tmp_path / "run"
    done = run_launch(
        cluster_args(
            cluster, cluster.hostfile(slots=1), "--launcher", launcher, str(tiny), f"run.out_dir={out}"
        ),
        launch_env(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{launcher}, 2 node(s), world size 2" in done.stderr
    assert_same_run(out, reference)
    assert_final_checkpoint(out)


@pytest.mark.timeout(90)
def test_an_unreachable_host_fails_fast_naming_it(cluster, probe, tmp_path):
    mods, out = probe
    hostfile = tmp_path / "hosts"
    dead = cluster.unused_addr()
    hostfile.write_text(f"{cluster.nodes[0].addr} slots=1\n{dead} slots=1\n")
    t0 = time.monotonic()
    done = run_launch(
        cluster_args(cluster, hostfile, "--ssh-timeout", "2", "--module", "launch_probe", str(out)),
        launch_env(mods),
        timeout=80,
    )
    assert done.returncode == 1
    assert f"node 1 ({dead}) is unreachable over ssh" in done.stderr
    assert time.monotonic() - t0 < 30
    assert leftovers(cluster.nodes[0], str(out)) == []  # nothing was started on the reachable node


@pytest.mark.timeout(120)
def test_a_rank_dying_on_node_1_fails_the_launch_and_stops_node_0(cluster, probe):
    mods, out = probe
    t0 = time.monotonic()
    done = run_launch(
        cluster_args(
            cluster,
            cluster.hostfile(slots=1),
            "--module",
            "launch_probe",
            "--env",
            "PROBE_DIE_RANK=1",
            str(out),
        ),
        launch_env(mods),
        timeout=110,
    )
    assert done.returncode != 0 and done.returncode != 124, done.stderr
    assert f"node 1 ({cluster.nodes[1].addr}) exited with code" in done.stderr
    assert "stopping the other nodes" in done.stderr
    assert time.monotonic() - t0 < 90
    deadline = time.monotonic() + 15  # remote ranks die with their ssh session
    while leftovers(cluster.nodes[0], str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(cluster.nodes[0], str(out)) == []


@pytest.mark.timeout(120)
def test_a_busy_rendezvous_port_on_node_0_fails_naming_node_0(cluster, probe):
    mods, out = probe
    node0 = cluster.nodes[0]
    holder = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            node0.netns,
            sys.executable,
            "-c",
            "import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 29611)); s.listen();"
            " print('listening', flush=True); time.sleep(300)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "listening"
        t0 = time.monotonic()
        done = run_launch(
            cluster_args(
                cluster,
                cluster.hostfile(slots=1),
                "--module",
                "launch_probe",
                "--master-port",
                "29611",
                "--rdzv-timeout",
                "30",
                str(out),
            ),
            launch_env(mods),
            timeout=110,
        )
        assert done.returncode != 0 and done.returncode != 124, done.stderr
        assert f"node 0 ({node0.addr}) exited with code" in done.stderr
        assert time.monotonic() - t0 < 90
    finally:
        holder.kill()
        holder.wait(timeout=10)
