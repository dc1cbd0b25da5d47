"""Launcher environments -> rank / local rank / world size (dist_opt.dist.env)."""

import pytest

from dist_opt.dist.env import LaunchEnvError, detect
from dist_opt.dist.slurm import expand_nodelist


def test_torchrun_env():
    e = detect(
        {
            "RANK": "3",
            "LOCAL_RANK": "1",
            "WORLD_SIZE": "4",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29500",
        }
    )
    assert (e.launcher, e.rank, e.local_rank, e.world_size, e.local_world_size) == ("torchrun", 3, 1, 4, 2)
    assert (e.master_addr, e.master_port) == ("10.0.0.1", 29500)


def test_open_mpi_env():
    e = detect(
        {
            "OMPI_COMM_WORLD_RANK": "5",
            "OMPI_COMM_WORLD_SIZE": "8",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        }
    )
    assert (e.launcher, e.rank, e.local_rank, e.world_size, e.local_world_size) == ("mpi", 5, 1, 8, 4)
    assert e.master_addr is None


def test_pmi_env():
    e = detect({"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0"})
    assert (e.launcher, e.rank, e.local_rank, e.world_size) == ("pmi", 2, 0, 3)


def test_slurm_env():
    e = detect(
        {"SLURM_PROCID": "7", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_NTASKS_PER_NODE": "4(x2)"}
    )
    assert (e.launcher, e.rank, e.local_rank, e.world_size, e.local_world_size) == ("slurm", 7, 3, 8, 4)


def test_sbatch_allocation_without_srun_is_not_a_launch():
    assert detect({"SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}).launcher == "none"


def test_torchrun_wins_over_outer_launcher():
    e = detect({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert e.launcher == "torchrun" and e.rank == 1


def test_no_launcher():
    e = detect({})
    assert (e.launcher, e.rank, e.world_size, e.is_launched) == ("none", 0, 1, False)


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE missing"),
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK missing"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=2 is not below WORLD_SIZE=2"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='x': expected an integer"),
        ({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE=0: expected >= 1"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK missing"),
        ({"OMPI_COMM_WORLD_RANK": "1"}, "OMPI_COMM_WORLD_SIZE missing"),
        ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
        (
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "5", "SLURM_NTASKS_PER_NODE": "2"},
            "local rank 5 is not below",
        ),
    ],
)
def test_bad_launcher_env_is_a_clear_error(env, needle):
    with pytest.raises(LaunchEnvError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        detect(env)


def test_slurm_nodelist_expansion():
    assert expand_nodelist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert expand_nodelist("a[8-10]") == ["a8", "a9", "a10"]
    with pytest.raises(ValueError):
        expand_nodelist("node[01-03")
