"""The process group a run lives in, read from the launcher's environment.

``accelerate launch`` (or torchrun, or the DeepSpeed launcher) starts the processes and
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
kdscale then owns the process group itself: NCCL on GPUs, gloo on CPUs, with a bounded
timeout so a lost rank ends the job instead of hanging it. The same context drives DDP
and DeepSpeed ZeRO, which is why kdscale does not build an ``accelerate.Accelerator``
(under ``--use_deepspeed`` on CPU-only machines it misreports the process count).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def gpu_for(local_rank: int, local_world_size: int, visible_gpus: int) -> int:
    """This process's GPU: its local rank. More processes on a node than visible GPUs would put
    two ranks on one GPU (NCCL: "Duplicate GPU detected"; DeepSpeed sets the device without
    wrapping around), so that is refused in one line."""
    if local_world_size > visible_gpus:
        from kdscale.errors import KdscaleError

        raise KdscaleError(f"{local_world_size} processes on this node but {visible_gpus} visible GPU(s) "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start one "
                           f"process per GPU (accelerate launch --num_processes {visible_gpus} per node)")
    return local_rank


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, timeout_s: int = 1800) -> "DistContext":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1)))
            device = torch.device("cuda", gpu_for(local_rank, local_world, torch.cuda.device_count()))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if world > 1 and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            # device_id binds the NCCL communicator to this rank's GPU at once (no guessing later).
            extra = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s), **extra)
        return cls(rank, world, local_rank, device)

    def ensure_process_group(self) -> None:
        """A process group even for one process (DeepSpeed needs one; without a launcher
        it would otherwise look for MPI)."""
        if not dist.is_initialized():
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place; ``op`` is ``sum``, ``mean`` or ``max``."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
            if op == "mean":
                tensor /= self.world_size
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` stacked along a new first dimension."""
        if not self.distributed:
            return tensor.unsqueeze(0)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        if self.distributed:
            dist.broadcast(tensor, src=src)

    def shutdown(self) -> None:
        shutdown_process_group()


def shutdown_process_group() -> None:
    """End the process group if one is up (every entry point does, in a ``finally``: a rank
    that exits with its group alive can abort in the group's destructor)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def init_deepspeed_comm(device: torch.device) -> None:
    """DeepSpeed's communication layer over the process group kdscale set up (NCCL on GPUs,
    gloo on CPUs): the one place it is started, before any DeepSpeed engine or ``zero.Init``.
    Calling it again does nothing."""
    import contextlib
    import io

    import deepspeed

    quiet = dist.is_initialized() and dist.get_rank() != 0  # its op-build notice is a print, once per rank
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
