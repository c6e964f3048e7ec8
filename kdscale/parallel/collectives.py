"""Collectives inside the methods' losses, where gradients must flow back across ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order. Each rank's loss reads every gathered row, so the backward
    sums the gathered gradient over ranks and hands each rank the part of its own rows; with
    DDP's gradient averaging this is the gradient of the term on the global batch."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        parts = [torch.empty_like(rows) for _ in range(size)]
        dist.all_gather(parts, rows.contiguous())
        ctx.start, ctx.count = rank * rows.shape[0], rows.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # reduced in place: never the autograd engine's own buffer
        dist.all_reduce(grad)
        return grad[ctx.start:ctx.start + ctx.count]


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows`` concatenated in rank order (gradients flow back to their rank);
    ``rows`` itself when there is one process. Every rank must pass the same number of rows."""
    return _GatherRows.apply(rows) if world()[1] > 1 else rows
