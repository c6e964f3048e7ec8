"""The one protocol the trainer uses of an engine (:class:`Engine`), and what every engine shares."""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch

from kdscale.methods import TeacherOutput
from kdscale.parallel.context import DistContext


def all_finite(loss: torch.Tensor, ctx: DistContext) -> bool:
    """Whether the loss is finite on every rank (a collective when distributed), decided
    before any backward so that all ranks skip or stop together."""
    bad = (~torch.isfinite(loss.detach())).any().float().reshape(1).to(ctx.device)
    return ctx.all_reduce(bad, "max").item() == 0


class Engine(Protocol):
    """What the trainer asks of an engine; it never asks which strategy runs."""

    strategy: str
    shards_parameters: bool
    """ZeRO-3: each rank holds a partition of the trained parameters (forwards are collectives)."""
    resumes_on_any_world_size: ClassVar[bool]
    counts_accumulation_itself: ClassVar[bool]
    """Steps at its own accumulation boundary (DeepSpeed), so a skipped micro-batch cannot be dropped alone."""

    def micro_step(self, phase: str, images: torch.Tensor, targets: torch.Tensor,
                   teacher_output: TeacherOutput | None, sync: bool, lr: float, autocast,
                   proceed=None, sample_indices: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], bool]:
        """One phase's forward, backward and (when ``sync``) step; ``sample_indices`` reach
        methods with ``needs_sample_indices``."""

    sharded_checkpoints: ClassVar[bool]
    """Checkpoints are per-rank shards (:meth:`write_shards`) rather than one file."""

    def checkpoint_state(self) -> dict:
        """What the engine puts into the checkpoint's metadata (:class:`kdscale.checkpoints.Checkpointer`
        writes it, and the shards when ``sharded_checkpoints``)."""

    def write_shards(self, directory: str) -> None:
        """With ``sharded_checkpoints``: every rank writes its part into ``directory`` (a collective)."""

    def load_checkpoint(self, path: str, state: dict) -> None:
        """Load the checkpoint at ``path`` back; ``state`` is its metadata."""

    def gathered_student_state(self) -> dict[str, torch.Tensor]:
        """The full student's weights on every rank (a collective under ZeRO-3): the export."""


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if torch.is_tensor(v))
