"""The default engine: the whole Distiller in one DistributedDataParallel wrapper, one torch
optimizer per phase; checkpoints are one file written by rank 0 and resume on any number of
ranks."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from kdscale.config.schema import ExperimentConfig
from kdscale.engines.protocol import all_finite, state_bytes
from kdscale.methods import Distiller
from kdscale.parallel.context import DistContext
from kdscale.runtime.optim import build_optimizer, set_lr


class DDPEngine:
    strategy = "ddp"
    shards_parameters = False
    resumes_on_any_world_size = True
    sharded_checkpoints = False
    counts_accumulation_itself = False

    def __init__(self, distiller: Distiller, cfg: ExperimentConfig, ctx: DistContext):
        self.distiller, self.ctx, self.cfg = distiller, ctx, cfg
        self.phases = distiller.phases()
        self.model: nn.Module = distiller
        if ctx.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                distiller, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                # Several phases: each forward/backward touches only some networks.
                find_unused_parameters=len(self.phases) > 1)
        self.optimizers = {name: build_optimizer(phase.param_groups(), cfg.optim)
                           for name, phase in self.phases.items()}

    def micro_step(self, phase: str, images, targets, teacher_output, sync: bool, lr: float, autocast,
                   proceed=None, sample_indices=None):
        """Forward, backward and (when ``sync``) the optimizer step of one phase; returns
        (loss terms, went on). ``proceed(loss)`` (default :func:`all_finite`; a collective,
        so every rank gets the same answer) decides before the backward: when it says no,
        no rank takes a backward or a step, and the window's accumulated gradients are dropped."""
        proceed = proceed or (lambda loss: all_finite(loss, self.ctx))
        accum = self.cfg.train.grad_accum_steps
        no_sync = self.model.no_sync if (not sync and self.ctx.distributed) else contextlib.nullcontext
        with no_sync():
            with autocast():
                _logits, losses = self.model(images, targets, teacher_output, phase=phase,
                                             sample_indices=sample_indices)
                loss = sum(losses.values())
            if not proceed(loss):
                self.optimizers[phase].zero_grad(set_to_none=True)
                return losses, False
            (loss / accum).backward()
        if sync:
            optimizer = self.optimizers[phase]
            set_lr(optimizer, lr)
            if self.cfg.train.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.phases[phase].module.parameters(),
                                               self.cfg.train.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return losses, True

    # -- measurement --------------------------------------------------------------
    def optimizer_state_bytes(self) -> int:
        return sum(state_bytes(opt) for opt in self.optimizers.values())

    def local_parameter_count(self) -> int:
        return sum(p.numel() for p in self.distiller.parameters() if p.requires_grad)

    def optimizer_parameter_count(self) -> int:
        """Parameter elements this rank's optimizers update (a tied parameter counts once)."""
        return sum(p.numel() for opt in self.optimizers.values() for group in opt.param_groups for p in group["params"])

    def gradient_bytes(self) -> int:
        """Gradient memory this rank holds (full gradients under DDP; they are freed by the
        optimizer step, so this is the peak between backward and step)."""
        return sum(p.numel() * p.element_size() for p in self.distiller.parameters() if p.requires_grad)

    # -- checkpoints (see kdscale.checkpoints) ---------------------------------
    def checkpoint_state(self) -> dict:
        """Every trained network and optimizer, whole: one file (every rank holds the same)."""
        return {"model": self.distiller.state_dict(),
                "optimizers": {phase: opt.state_dict() for phase, opt in self.optimizers.items()}}

    def load_checkpoint(self, path: str, state: dict) -> None:
        self.distiller.load_state_dict(state["model"])
        for phase, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][phase])

    def gathered_student_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.distiller.student.state_dict().items()}
