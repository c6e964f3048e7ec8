"""The ``crd_bank`` probe: CRD's memory banks for a training set of a given size, sharded over
the ranks: the bytes of this rank's rows, the resident memory they added, and the seconds
per step of the contrast loss's forward and backward (median over the steps after the
first) on random embeddings."""

from __future__ import annotations

import os
import statistics
import time

import torch

from kdscale.methods.contrast_memory import ContrastMemory, ContrastSampler
from kdscale.parallel.context import DistContext


def _resident_bytes(device: torch.device | None = None) -> int:
    """The memory the banks live in: the GPU's allocated bytes on a GPU, else this process's
    resident host memory."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_crd_bank(ctx: DistContext, samples: int, dim: int, batch: int, negatives: int, steps: int) -> dict:
    ContrastMemory(1 << 13, dim, seed=1, device=ctx.device)  # first-use costs (threads, allocator) left out
    before = _resident_bytes(ctx.device)
    memory = ContrastMemory(samples, dim, seed=0, device=ctx.device)
    added = _resident_bytes(ctx.device) - before
    sampler = ContrastSampler(torch.arange(samples) % 1000, "other_class", seed=0)
    gen = torch.Generator().manual_seed(ctx.rank)
    times = []
    for step in range(steps + 1):
        v_s, v_t = (torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(ctx.device)
                    for _ in range(2))
        v_s.requires_grad_(True)
        indices = torch.randint(0, samples, (batch,), generator=gen).to(ctx.device)
        start = time.perf_counter()
        memory.contrast_loss(v_s, v_t, indices, sampler, negatives, 0.07, 0.5).backward()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    return {"bank_bytes": memory.bytes_per_rank(), "resident_bytes_added": added, "rows": memory.rows,
            "step_seconds": statistics.median(times)}
