"""PeerMonitor's failure diagnosis on a real key-value store (torch's HashStore, one process).

Rank 1's monitor writes one heartbeat and then "dies" (it never beats again); rank 0 diagnoses a
failed collective. The silent rank is named with the age of its last heartbeat (not a step it
passed long ago), and a stop request ends the wait for its report at once.
"""

from __future__ import annotations

import re
import time

import pytest
import torch.distributed as dist

from dist_opt.peers import PeerMonitor


def _pair(timeout_s: float) -> tuple[PeerMonitor, PeerMonitor]:
    store = dist.HashStore()
    ranks = [
        PeerMonitor(r, 2, timeout_s, lambda: 0, exit_process=lambda why: None, store=store) for r in (0, 1)
    ]
    return ranks[0], ranks[1]


def test_a_silent_rank_is_named_with_the_age_of_its_last_heartbeat():
    rank0, _dead = _pair(timeout_s=10.0)  # grace 3 s
    time.sleep(0.3)
    text = rank0.post_mortem("all_reduce", 5)
    m = re.search(r"rank 1 is not responding \(dead or unreachable; last heartbeat (\d+\.\d) s ago\)", text)
    assert m, text
    assert 3.0 <= float(m.group(1)) < 10.0  # the heartbeat written at start, a grace period ago
    assert "after step" not in text


@pytest.mark.parametrize("when", ["before", "during"])
def test_a_stop_request_ends_the_wait_for_a_dead_rank(when):
    rank0, _dead = _pair(timeout_s=300.0)  # grace 25 s
    if when == "before":  # the launcher's SIGTERM arrived just before the collective failed
        rank0.hurry()
    else:
        import threading

        threading.Timer(0.5, rank0.hurry).start()
    t0 = time.monotonic()
    text = rank0.post_mortem("all_reduce", 5)
    assert time.monotonic() - t0 < 3.0, text
    assert "rank 1 is not responding (dead or unreachable; last heartbeat" in text


def test_an_old_stop_request_does_not_cut_a_later_diagnosis_short(monkeypatch):
    rank0, _dead = _pair(timeout_s=10.0)  # grace 3 s
    rank0.hurry()
    monkeypatch.setattr("dist_opt.peers.HURRY_WINDOW_S", 0.0)  # the request is older than the window
    t0 = time.monotonic()
    rank0.post_mortem("all_reduce", 5)
    assert time.monotonic() - t0 >= 2.5
