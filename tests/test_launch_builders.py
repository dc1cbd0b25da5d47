"""Per-launcher argv/env builders, the env allow-list, OMP_NUM_THREADS, --dry-run and CLI input errors.

References: DeepSpeed's own world_info codec, dist_opt.dist.env.detect / group.rendezvous_address
(what the ranks will compute from the environment the launcher gives them), and a real POSIX
shell for the quoting of remote commands.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deepspeed.launcher.runner import encode_world_info
from environment import require_or_skip

from dist_opt.dist.env import detect
from dist_opt.launch.backends import deepspeed, local, mpirun, slurm, torchrun
from dist_opt.launch.cli import main
from dist_opt.launch.envvars import forwarded_env, omp_threads, parse_env_assignments
from dist_opt.launch.errors import LaunchError
from dist_opt.launch.plan import Request, SshOptions
from dist_opt.launch.remote import header_env
from dist_opt.launch.selection import Node
from dist_opt.launch.ssh import remote_command, ssh_argv

REPO = Path(__file__).resolve().parents[1]
PY = "/opt/venv/bin/python"
WEIRD = "wandb.name=a b; $(touch pwned) 'q\" `x`"


def request(launcher: str, nodes: list[Node], **kw) -> Request:
    base = dict(
        launcher=launcher,
        nodes=nodes,
        config="/cfg/tiny.yaml",
        overrides=("train.steps=3", WEIRD),
        python=PY,
        cwd="/work",
        run_id="rid",
        cores_per_node=8,
        environ={},
        extra_env={},
    )
    base.update(kw)
    return Request(**base)


TWO = [Node("10.0.0.1", (0, 1)), Node("10.0.0.2", (0, 1, 2, 3))]


def _flag(argv: list[str], name: str) -> str:
    [value] = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    return value


# --- environment -----------------------------------------------------------------------------------


def test_env_assignments_parse_and_reject_bad_items():
    assert parse_env_assignments(["A=1", "GLOO_SOCKET_IFNAME=eth0", "B=x=y", "C="]) == {
        "A": "1",
        "GLOO_SOCKET_IFNAME": "eth0",
        "B": "x=y",
        "C": "",
    }
    for item, words in [
        ("NOEQUALS", "expected KEY=VALUE"),
        ("1A=x", "not a valid environment variable"),
        ("A-B=x", "not a valid"),
        ("RANK=3", "RANK is set by the launcher"),
        ("MASTER_ADDR=h", "--master-addr"),
        ("SLURM_PROCID=1", "set by the launcher"),
        ("OMPI_COMM_WORLD_RANK=0", "set by the launcher"),
    ]:
        with pytest.raises(LaunchError) as err:
            parse_env_assignments([item])
        assert words in str(err.value) and item.split("=")[0] in str(err.value)


def test_only_allow_listed_variables_are_forwarded_and_env_flags_win():
    environ = {
        "PATH": "/x",
        "HOME": "/root",
        "SSH_AUTH_SOCK": "/s",
        "AWS_SECRET_ACCESS_KEY": "k",
        "NCCL_DEBUG": "INFO",
        "GLOO_SOCKET_IFNAME": "eth1",
        "PYTHONPATH": "/src",
        "WANDB_MODE": "offline",
        "DIST_OPT_X": "1",
        "TORCH_DISTRIBUTED_DEBUG": "DETAIL",
        "OMP_NUM_THREADS": "16",
        "DS_ACCELERATOR": "cpu",
    }
    env = forwarded_env(environ, {"GLOO_SOCKET_IFNAME": "eth0", "MY_FLAG": "on"}, omp_num_threads=2)
    assert env == {
        "DIST_OPT_X": "1",
        "DS_ACCELERATOR": "cpu",
        "GLOO_SOCKET_IFNAME": "eth0",
        "MY_FLAG": "on",
        "NCCL_DEBUG": "INFO",
        "OMP_NUM_THREADS": "2",
        "PYTHONPATH": "/src",
        "TORCH_DISTRIBUTED_DEBUG": "DETAIL",
        "WANDB_MODE": "offline",
    }
    assert forwarded_env(environ, {"OMP_NUM_THREADS": "3"}, omp_num_threads=2)["OMP_NUM_THREADS"] == "3"


@pytest.mark.parametrize("cores, procs, expected", [(16, 4, 4), (16, 3, 5), (2, 2, 1), (2, 4, 1), (1, 1, 1)])
def test_omp_threads_is_cores_per_rank(cores, procs, expected):
    assert omp_threads(cores, procs) == expected
    assert omp_threads(cores, procs) * procs <= max(cores, procs)


# --- torchrun ----------------------------------------------------------------------------------------


def test_torchrun_one_agent_per_node_with_c10d_hosted_by_node_0():
    plan = torchrun.build(request("torchrun", TWO, max_restarts=2, rdzv_timeout=77))
    assert [p.host for p in plan.procs] == ["10.0.0.1", "10.0.0.2"] and plan.world_size == 6
    for i, proc in enumerate(plan.procs):
        a = proc.argv
        assert a[:3] == [PY, "-m", "torch.distributed.run"]
        assert _flag(a, "--nnodes") == "2"
        assert _flag(a, "--nproc-per-node") == str(TWO[i].nproc)
        assert _flag(a, "--rdzv-endpoint") == "10.0.0.1:29500"
        assert _flag(a, "--rdzv-backend") == "c10d" and _flag(a, "--rdzv-id") == "rid"
        assert _flag(a, "--rdzv-conf") == f"is_host={1 if i == 0 else 0},join_timeout=77"
        assert _flag(a, "--local-addr") == TWO[i].host and _flag(a, "--max-restarts") == "2"
        assert a[-5:] == ["-m", "dist_opt.train", "/cfg/tiny.yaml", "train.steps=3", WEIRD]
        assert proc.env["OMP_NUM_THREADS"] == str(8 // TWO[i].nproc)
        assert proc.remote


def test_other_nodes_count_their_own_cores_for_omp_threads_unless_told():
    environ = {"OMP_NUM_THREADS": "16"}  # the launching machine's value does not travel
    for builder in (torchrun.build, deepspeed.build):
        plan = builder(request("torchrun", TWO, cores_per_node=None, environ=environ))
        assert [p.omp_ranks for p in plan.procs] == [2, 4]
        assert all("OMP_NUM_THREADS" not in p.env for p in plan.procs)
        given = builder(request("torchrun", TWO, cores_per_node=None, extra_env={"OMP_NUM_THREADS": "3"}))
        assert [p.env["OMP_NUM_THREADS"] for p in given.procs] == ["3", "3"]  # --env wins, on every node
        told = builder(request("torchrun", TWO, cores_per_node=8, environ=environ))
        assert [p.omp_ranks for p in told.procs] == [None, None]  # --cores-per-node: computed here
    one = local.build(request("local", [Node("localhost", (0, 1))], cores_per_node=None))
    assert one.procs[0].omp_ranks is None
    assert one.procs[0].env["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))


@pytest.mark.parametrize(
    "header, expected",
    [
        ({"env": {"A": "1"}}, {"A": "1"}),
        ({"env": {}, "omp_ranks": 4}, {"OMP_NUM_THREADS": "3"}),  # 12 cores // 4 ranks
        ({"env": {}, "omp_ranks": 24}, {"OMP_NUM_THREADS": "1"}),
        ({"env": {"OMP_NUM_THREADS": "5"}, "omp_ranks": 4}, {"OMP_NUM_THREADS": "5"}),  # the user's value
    ],
)
def test_shim_sets_omp_threads_from_the_nodes_cores(header, expected):
    assert header_env(header, cores=12) == expected


def test_shim_rejects_a_bad_omp_ranks():
    with pytest.raises(ValueError, match="omp_ranks"):
        header_env({"env": {}, "omp_ranks": 0}, cores=12)


def test_torchrun_single_local_node_uses_loopback_and_a_free_port():
    plan = torchrun.build(request("torchrun", [Node("localhost", (0, 1))]))
    [proc] = plan.procs
    host, port = _flag(proc.argv, "--rdzv-endpoint").rsplit(":", 1)
    assert host == "127.0.0.1" and 1024 <= int(port) <= 65535 and not proc.remote
    assert _flag(proc.argv, "--local-addr") == "127.0.0.1"


def test_torchrun_ipv6_endpoint_is_bracketed_and_explicit_master_wins():
    plan = torchrun.build(request("torchrun", [Node("fe80::1", (0,)), Node("fe80::2", (0,))]))
    assert _flag(plan.procs[1].argv, "--rdzv-endpoint") == "[fe80::1]:29500"
    plan = torchrun.build(request("torchrun", TWO, master_addr="head", master_port=1234))
    assert _flag(plan.procs[0].argv, "--rdzv-endpoint") == "head:1234"


def test_localhost_cannot_be_one_of_several_nodes():
    with pytest.raises(LaunchError, match="localhost cannot be one of several nodes"):
        torchrun.build(request("torchrun", [Node("localhost", (0,)), Node("10.0.0.2", (0,))]))


# --- deepspeed ---------------------------------------------------------------------------------------


def test_deepspeed_single_node_hands_over_to_the_deepspeed_runner():
    plan = deepspeed.build(request("deepspeed", [Node("localhost", (0, 1, 2))], python=sys.executable))
    [proc] = plan.procs
    head = proc.argv[:3]
    assert head[0].endswith("/deepspeed") or head == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert "--num_gpus=3" in proc.argv and "--master_addr=127.0.0.1" in proc.argv
    i = proc.argv.index("--module")
    assert proc.argv[i:] == [
        "--module",
        "--no_local_rank",
        "dist_opt.train",
        "/cfg/tiny.yaml",
        "train.steps=3",
        WEIRD,
    ]


def test_deepspeed_multi_node_runs_deepspeeds_node_launcher_with_its_world_info():
    plan = deepspeed.build(request("deepspeed", TWO))
    expected = encode_world_info({"10.0.0.1": [0, 1], "10.0.0.2": [0, 1, 2, 3]})  # DeepSpeed's own codec
    for i, proc in enumerate(plan.procs):
        assert proc.argv[:4] == [PY, "-u", "-m", "deepspeed.launcher.launch"]
        assert _flag(proc.argv, "--world_info") == expected
        assert json.loads(base64.urlsafe_b64decode(expected)) == {
            "10.0.0.1": [0, 1],
            "10.0.0.2": [0, 1, 2, 3],
        }
        assert _flag(proc.argv, "--node_rank") == str(i) and _flag(proc.argv, "--master_addr") == "10.0.0.1"


def test_max_restarts_is_torchrun_only():
    for builder in (deepspeed.build, mpirun.build, local.build):
        with pytest.raises(LaunchError, match="--max-restarts is supported by --launcher torchrun only"):
            builder(request("x", [Node("localhost", (0,))], max_restarts=1, allow_run_as_root=True))


# --- mpirun ------------------------------------------------------------------------------------------


def test_mpirun_one_mpiexec_with_hosts_slots_and_exported_names():
    req = request(
        "mpirun",
        TWO,
        extra_env={"WANDB_API_KEY": "s3cret"},
        allow_run_as_root=True,
        ssh=SshOptions(config="/k/ssh_config"),
        dry_run=True,
    )
    [proc] = mpirun.build(req).procs
    a = proc.argv
    assert a[a.index("-n") + 1] == "6" and a[a.index("--host") + 1] == "10.0.0.1:2,10.0.0.2:4"
    assert "--allow-run-as-root" in a
    assert "-F /k/ssh_config" in a[a.index("plm_ssh_args") + 1]
    exported = [a[i + 1] for i, x in enumerate(a) if x == "-x"]
    assert set(exported) == set(proc.env) and "WANDB_API_KEY" in exported
    assert "s3cret" not in " ".join(a)  # values stay in the environment, not on the command line
    assert proc.env["MASTER_ADDR"] == "10.0.0.1" and "MASTER_PORT" not in proc.env  # port: MPI broadcast
    assert a[-7:] == [PY, "-u", "-m", "dist_opt.train", "/cfg/tiny.yaml", "train.steps=3", WEIRD]


def test_mpirun_as_root_needs_an_explicit_opt_in():
    if os.geteuid() != 0:
        require_or_skip("the root refusal only applies when running as root")
    with pytest.raises(LaunchError, match="--allow-run-as-root"):
        mpirun.build(request("mpirun", [Node("localhost", (0, 1))], dry_run=True))
    env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    [proc] = mpirun.build(request("mpirun", [Node("localhost", (0, 1))], environ=env, dry_run=True)).procs
    assert "--allow-run-as-root" not in proc.argv


# --- slurm -------------------------------------------------------------------------------------------

SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[01-02,07]",
    "SLURM_NTASKS_PER_NODE": "2(x3)",
    "SLURM_CPUS_ON_NODE": "16",
}


def test_slurm_nodes_come_from_the_allocation():
    nodes = slurm.allocation_nodes(SLURM_ENV, None, None)
    assert nodes == [Node("gpu01", (0, 1)), Node("gpu02", (0, 1)), Node("gpu07", (0, 1))]
    assert slurm.allocation_nodes(SLURM_ENV, 2, 4) == [
        Node("gpu01", (0, 1, 2, 3)),
        Node("gpu02", (0, 1, 2, 3)),
    ]
    assert slurm.cores_on_node(SLURM_ENV) == 16
    with pytest.raises(LaunchError, match="not inside a SLURM allocation"):
        slurm.allocation_nodes({}, None, None)
    with pytest.raises(LaunchError, match="the allocation has only 3 node"):
        slurm.allocation_nodes(SLURM_ENV, 4, None)
    with pytest.raises(LaunchError, match="unbalanced"):
        slurm.allocation_nodes({**SLURM_ENV, "SLURM_JOB_NODELIST": "gpu[01-02"}, None, None)


def test_slurm_srun_step_and_the_address_the_ranks_will_compute(monkeypatch):
    nodes = slurm.allocation_nodes(SLURM_ENV, None, None)
    [proc] = slurm.build(request("slurm", nodes, environ=SLURM_ENV, cores_per_node=16, dry_run=True)).procs
    a = proc.argv
    assert a[1:9] == [
        "--nodes=3",
        "--nodelist=gpu01,gpu02,gpu07",
        "--ntasks=6",
        "--ntasks-per-node=2",
        "--cpus-per-task=8",
        "--kill-on-bad-exit=1",
        "--export=ALL",
        PY,
    ]
    assert proc.env["OMP_NUM_THREADS"] == "8"
    # Reference: what dist_opt.dist.group derives inside a task of this step without MASTER_* set.
    from dist_opt.dist import group

    task_env = {**SLURM_ENV, "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "6"}
    for k, v in task_env.items():
        monkeypatch.setenv(k, v)
    rank_env = detect(task_env)
    assert rank_env.master_addr is None and rank_env.rank == 3
    assert group.rendezvous_address(rank_env) == (proc.env["MASTER_ADDR"], int(proc.env["MASTER_PORT"]))


# --- local -------------------------------------------------------------------------------------------


def test_local_launcher_gives_each_rank_an_environment_dist_opt_understands():
    plan = local.build(request("local", [Node("localhost", (0, 1, 2))]))
    seen = [detect(p.env) for p in plan.procs]
    assert [(e.launcher, e.rank, e.local_rank, e.world_size) for e in seen] == [
        ("torchrun", r, r, 3) for r in range(3)
    ]
    assert len({(e.master_addr, e.master_port) for e in seen}) == 1
    with pytest.raises(LaunchError, match="runs on this machine only"):
        local.build(request("local", TWO))


# --- ssh and the node shim ---------------------------------------------------------------------------


def test_ssh_argv_keeps_host_and_command_as_single_items():
    argv = ssh_argv(
        "10.0.0.2",
        "cd /x && exec y",
        SshOptions(config="/c", port=2222, options=("User=bob",), connect_timeout=3),
    )
    assert argv[0] == "ssh" and argv[-3:] == ["--", "10.0.0.2", "cd /x && exec y"]
    assert ["-F", "/c"] == argv[argv.index("-F") : argv.index("-F") + 2] and "ConnectTimeout=3" in argv
    assert argv[argv.index("-p") + 1] == "2222" and "BatchMode=yes" in argv


def test_remote_command_survives_a_real_shell_and_the_shim_runs_it(tmp_path):
    args = [WEIRD, "a b", "'", '"', "$HOME", "`id`", ";", "&&", "x\ny"]
    printer = [
        sys.executable,
        "-c",
        "import json, os, sys; print(json.dumps([sys.argv[1:], os.getcwd(), os.environ.get('SHIM_VAR'),"
        " os.environ.get('OMP_NUM_THREADS')]))",
        *args,
    ]
    cmd = remote_command(sys.executable, str(tmp_path), printer, pythonpath=str(REPO))
    assert shlex.split(cmd)[:2] == ["cd", str(tmp_path)]
    shell = subprocess.Popen(["sh", "-c", cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    # omp_ranks: the node computes OMP_NUM_THREADS from its own cores (over this process's OMP_NUM_THREADS=1)
    shell.stdin.write(json.dumps({"env": {"SHIM_VAR": "v $x"}, "omp_ranks": 1}) + "\n")
    shell.stdin.flush()  # stdin stays open, as ssh's does while the launch runs
    out = shell.stdout.read()
    assert shell.wait(timeout=60) == 0
    shell.stdin.close()
    assert json.loads(out) == [args, str(tmp_path), "v $x", str(len(os.sched_getaffinity(0)))]
    assert not (tmp_path / "pwned").exists()


def test_shim_kills_its_command_when_the_launcher_side_goes_away(tmp_path):
    pidfile = tmp_path / "pid"
    script = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    shim = subprocess.Popen(
        [sys.executable, "-m", "dist_opt.launch.remote", "--", sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        cwd=REPO,
    )
    shim.stdin.write(b'{"env": {}}\n')
    shim.stdin.flush()
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "command did not start"
        time.sleep(0.05)
    child = int(pidfile.read_text())
    t0 = time.monotonic()
    shim.stdin.close()  # the ssh connection is gone
    assert shim.wait(timeout=30) == 128 + 15  # SIGTERM
    assert time.monotonic() - t0 < 10
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_shim_passes_a_stop_request_on_to_its_command_as_sigterm(tmp_path):
    marker = tmp_path / "term"
    script = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w').write('saved'), sys.exit(4)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    shim = subprocess.Popen(
        [sys.executable, "-m", "dist_opt.launch.remote", "--", sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    shim.stdin.write(b'{"env": {}}\n')
    shim.stdin.flush()
    assert shim.stdout.readline().strip() == b"ready"
    shim.stdin.write(b"TERM\n")  # the launcher stops the run; the connection stays open
    shim.stdin.flush()
    assert shim.wait(timeout=30) == 4  # the command's own exit code: it handled SIGTERM (saved)
    shim.stdin.close()
    assert marker.read_text() == "saved"


def test_shim_rejects_a_missing_header():
    done = subprocess.run(
        [sys.executable, "-m", "dist_opt.launch.remote", "--", "true"],
        input=b"",
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 2 and b"no header on stdin" in done.stderr


# --- CLI: --dry-run and bad input -------------------------------------------------------------------


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"run: {{out_dir: {tmp_path / 'run'}}}\ntask: {{name: synthetic, dim: 8, hidden: 16}}\n"
        "data: {global_batch: 8, micro_batch: 2}\ntrain: {steps: 2, progress: false}\n"
    )
    return path


def test_dry_run_prints_every_node_command_and_starts_nothing(tmp_path, config, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "very-secret")
    hf = tmp_path / "hosts"
    hf.write_text("10.9.9.1 slots=2\n10.9.9.2 slots=2\n")  # unroutable: a real launch would fail
    rc = main(
        [
            "--dry-run",
            "--hostfile",
            str(hf),
            "--env",
            "GLOO_SOCKET_IFNAME=eth0",
            "--cores-per-node",
            "8",
            str(config),
            "train.steps=1",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    lines = [ln for ln in out.splitlines() if ln.startswith("env ")]
    assert len(lines) == 2
    for i, line in enumerate(lines):
        words = shlex.split(line)
        assert "GLOO_SOCKET_IFNAME=eth0" in words and "OMP_NUM_THREADS=4" in words
        assert "WANDB_API_KEY=<redacted>" in words and f"--local-addr=10.9.9.{i + 1}" in words
        assert words[-4:] == ["-m", "dist_opt.train", str(config), "train.steps=1"]
    assert "very-secret" not in out
    assert out.count("#   via: ssh ") == 2
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv_tail, code, words",
    [
        (["--launcher", "nope"], 2, "invalid choice: 'nope'"),
        (["--nproc-per-node", "0"], 2, "must be a positive integer"),
        (["--master-port", "70000"], 2, "TCP port"),
        (["--env", "RANK=1"], 2, "RANK is set by the launcher"),
        (["--master-addr", "bad host"], 2, "not a valid host name"),
        (["--module", "os; rm"], 2, "not a Python module name"),
        (["--include", "a"], 2, "--include/--exclude need --hostfile"),
        (["--launcher", "slurm"], 2, "not inside a SLURM allocation"),
        (["--ssh-option", "nonsense"], 2, "expected Key=Value"),
    ],
)
def test_bad_options_exit_2_with_one_line(config, capsys, monkeypatch, argv_tail, code, words):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert main([*argv_tail, "--dry-run", str(config)]) == code
    err = capsys.readouterr().err
    assert words in err and err.startswith("dist-opt launch: ")


def test_bad_hostfile_exits_2_naming_file_and_line(tmp_path, config, capsys):
    hf = tmp_path / "hosts"
    hf.write_text("good slots=1\nbad_name slots=1\n")
    assert main(["--hostfile", str(hf), str(config)]) == 2
    assert f"{hf}:2: 'bad_name' is not a valid host name" in capsys.readouterr().err


def test_config_errors_exit_2_before_anything_starts(config, capsys):
    assert main(["--dry-run", str(config), "optimizer.lr=-1"]) == 2
    assert "optimizer.lr" in capsys.readouterr().err
    assert main(["--dry-run", "--nproc-per-node", "3", str(config)]) == 2  # 8 % (2 x 3) != 0
    assert "data.global_batch" in capsys.readouterr().err
    assert main(["--dry-run", str(config), "--nproc-per-node", "2"]) == 2
    assert "options must come before CONFIG" in capsys.readouterr().err


def test_python_dash_m_launch_is_the_same_cli(config):
    done = subprocess.run(
        [sys.executable, "-m", "dist_opt.launch", "--dry-run", "--nproc-per-node", "2", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert "torch.distributed.run" in done.stdout and "--nproc-per-node=2" in done.stdout
    assert "DeprecationWarning" not in done.stderr


def test_old_python_dash_m_launch_from_a_checkout_still_works_and_warns(config):
    done = subprocess.run(
        [sys.executable, "-m", "launch", "--dry-run", "--nproc-per-node", "2", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert "torch.distributed.run" in done.stdout and "--nproc-per-node=2" in done.stdout
    assert "DeprecationWarning" in done.stderr and "python -m dist_opt.launch" in done.stderr


def test_the_launcher_never_imports_torch(config):
    code = (
        "import sys; from dist_opt.launch.cli import main; "
        f"rc = main(['--dry-run', '--launcher', 'deepspeed', '--nproc-per-node', '2', {str(config)!r}]); "
        "print(rc, 'torch' in sys.modules, 'deepspeed' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.stdout.split()[-3:] == ["0", "False", "False"], done.stderr
