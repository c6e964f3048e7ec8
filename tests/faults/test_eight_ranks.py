"""One rank of 8 killed (kill -9) or stopped (SIGSTOP) mid-run: the job ends in bounded
time, non-zero, naming the cause, with no rank, loader worker or launcher left behind, as
at 2 ranks (tests/faults/test_faults.py). The rank hit is a middle one (rank 3): neither
the first nor the last."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
from helpers.common import base_overrides
from helpers.jobs import descendants, finish, is_rank, processes, start, wait_for_steps

pytestmark = pytest.mark.slow  # real multi-process runs: the full tier only

STALL_S = 40  # well above a step of 8 processes on 2 busy cores (the first takes seconds)


def rank_pids(job) -> dict[int, int]:
    """Rank -> pid of the job's 8 rank processes (their environment names the rank)."""
    table = processes()
    found = {}
    for pid in descendants(job.pid):
        if is_rank(table.get(pid, (0, ""))[1]):
            with contextlib.suppress(OSError):
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                rank = next(int(v.split(b"=", 1)[1]) for v in env if v.startswith(b"RANK="))
                found[rank] = pid
    return found


def gone(family: list[int], within: float) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(p in processes() for p in family):
        time.sleep(0.5)
    return [p for p in family if p in processes()]


@pytest.mark.parametrize("fault", ["kill9", "sigstop"])
def test_one_rank_of_eight_ends_the_job(fault, synth_data, tmp_path):
    log = tmp_path / "job.log"
    args = base_overrides(synth_data, str(tmp_path), name="eight") + [
        "student.name=resnet8", "data.batch_size=4", "data.num_workers=1", "train.epochs=20",
        "train.log_every_steps=1", f"train.stall_timeout_s={STALL_S}"]
    job = start(args, log, ranks=8)
    wait_for_steps(tmp_path / "eight", 2, job, log, timeout=300)
    ranks = rank_pids(job)
    assert sorted(ranks) == list(range(8)), ranks
    family = descendants(job.pid)
    victim = ranks[3]
    hit = time.monotonic()
    try:
        os.kill(victim, signal.SIGKILL if fault == "kill9" else signal.SIGSTOP)
        code = finish(job, STALL_S + 120)
        took = time.monotonic() - hit
        left = gone(family, 30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    text = open(log).read()
    assert code != 0, text[-3000:]
    assert not left, f"outlived the job: {left}"
    if fault == "sigstop":  # the other ranks wait in a collective until their watchdog ends them
        assert code == 3, text[-3000:]
        assert "stalled: nothing finished for" in text, text[-4000:]
        assert took < STALL_S + 120
    else:
        assert took < 120
