"""Each rank's own random generators: seeded apart after the networks are built, saved in the
checkpoint one per rank, and restored each to its own rank (2 real gloo processes), also on
another world size."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdscale import checkpoints as ckpt
from kdscale.parallel.context import DistContext

pytestmark = pytest.mark.slow  # real processes


def _rank(rank: int, store_path: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    ctx = DistContext(rank, 2, rank, torch.device("cpu"))
    torch.manual_seed(0)
    weights = torch.randn(4)  # built from one seed: the same on both ranks
    ckpt.seed_per_rank(0, rank)
    saved = ckpt.capture_rng_state(ctx)  # a collective
    mine = torch.get_rng_state()
    first = torch.rand(3)  # what this rank draws next
    torch.rand(100)  # ... the run goes on, then resumes
    ckpt.restore_rng_state(saved, rank, 2)
    again = torch.rand(3)
    torch.save({"weights": weights, "state": mine, "first": first, "again": again, "saved": saved},
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_each_rank_gets_its_own_generators_back(tmp_path):
    mp.start_processes(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["weights"], r1["weights"])  # identical initial weights
    assert not torch.equal(r0["state"], r1["state"])  # ... then a stream per rank (own dropout masks)
    for result in (r0, r1):
        assert torch.equal(result["first"], result["again"])  # the resume draws what the run drew
    saved = r0["saved"]["per_rank"]
    assert len(saved) == 2 and torch.equal(saved[0]["torch"], r0["state"]) and torch.equal(saved[1]["torch"], r1["state"])
    # Another world size: one process takes saved rank 0's states, a third rank of three wraps around.
    ckpt.restore_rng_state(r0["saved"], rank=0, world_size=1)
    assert torch.equal(torch.get_rng_state(), r0["state"])
    ckpt.restore_rng_state(r0["saved"], rank=2, world_size=3)
    assert torch.equal(torch.get_rng_state(), r0["state"])
    # A checkpoint from before (one state for every rank) still loads.
    ckpt.restore_rng_state({"python": __import__("random").getstate(), "torch": r1["state"]}, rank=1, world_size=2)
    assert torch.equal(torch.get_rng_state(), r1["state"])
