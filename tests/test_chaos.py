"""The chaos run in small: three faults (a rank SIGKILL, a launcher SIGKILL, a corrupted newest
checkpoint after a preemption stop), each followed by a restart with ``resume=latest``; every fault
is survived, no process outlives its attempt, and the final parameters equal an uninterrupted run's
bit for bit. Also: the checkpoint group honours ``distributed.timeout_s`` (a peer stalled in the
middle of a save is detected like one stalled in a training step)."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import pytest

from bench.chaos_run import Settings, run_chaos

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and signals")


@pytest.mark.timeout(300)
def test_three_faults_are_survived_without_orphans_and_end_bit_equal(tmp_path):
    kinds = ["launcher_sigkill", "rank_sigkill", "corrupt_checkpoint"]
    settings = Settings(steps=40, every=5, step_sleep=0.02)
    result = run_chaos(tmp_path / "chaos", kinds, settings, 3, lambda line: None, in_process_reference=True)
    rows = [
        (r.kind, r.exit_code, r.at_step, r.last_step, r.resumed_from, r.orphans, r.note)
        for r in result.records
    ]
    assert [r.kind for r in result.records] == kinds
    assert result.survived == 3, rows
    assert result.orphans == 0, rows
    assert result.final_exit == 0
    assert result.bit_equal, result.differing
    corrupt = result.records[2]
    assert corrupt.resumed_from is not None and corrupt.resumed_from < corrupt.last_step, rows


def _stalled_peer_in_checkpoint_group(rank: int, world: int, out_dir: str) -> float | None:
    import torch.distributed as dist

    from dist_opt.checkpoint import CheckpointExtension
    from dist_opt.config import load_config

    cfg = load_config(None, ["checkpoint.every_steps=1", "distributed.timeout_s=2", f"run.out_dir={out_dir}"])
    ext = CheckpointExtension(cfg)
    ext.setup(SimpleNamespace(rank=rank, world=world))  # creates the checkpoint group (collective)
    took = None
    if rank == 1:  # rank 1 joins the group's collective only well after the timeout
        time.sleep(5.0)
    t0 = time.monotonic()
    try:
        dist.barrier(group=ext.group)
    except RuntimeError:
        took = time.monotonic() - t0
    dist.barrier()
    dist.destroy_process_group(ext.group)
    return took


@pytest.mark.timeout(120)
def test_checkpoint_group_times_out_after_distributed_timeout_s(tmp_path, world2):
    took, _ = world2.run(_stalled_peer_in_checkpoint_group, str(tmp_path / "run"))
    assert took is not None, "rank 0 waited for the stalled peer past distributed.timeout_s"
    assert took < 4.5, took
