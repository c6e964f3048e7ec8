"""Training engines: who owns the trainable networks, their optimizers and checkpoints.

Both implement :class:`Engine`, the one protocol the trainer uses.

- :class:`DDPEngine` (default): the whole Distiller in one DistributedDataParallel
  wrapper, one torch optimizer per phase (:meth:`Distiller.phases`). Checkpoints are one file written by
  rank 0; they resume on any number of ranks.
- :class:`DeepSpeedEngine`: DeepSpeed ZeRO stage 1, 2 or 3 over **every** trainable
  network: one engine over the whole Distiller, or, for a method with several optimizer
  phases (ProKT), one engine per phase module, each with its own optimizer. Checkpoints
  are DeepSpeed's sharded ones (every rank writes its shard) and resume on the same
  number of ranks only.

Frozen teachers never enter an engine: they are not part of the Distiller.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, Protocol

import torch
from torch import nn

from kdscale.config.schema import ExperimentConfig
from kdscale.runtime.context import DistContext
from kdscale.methods import Distiller, TeacherOutput
from kdscale.runtime import checkpoint as ckpt
from kdscale.runtime.optim import build_optimizer, set_lr


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

    def write_checkpoint(self, run_dir: str, meta: dict, step: int, keep: int) -> None: ...

    def restore(self, path: str, state: dict) -> None:
        """Load what :meth:`write_checkpoint` wrote at ``path``; ``state`` is its metadata."""

    def gathered_student_state(self) -> dict[str, torch.Tensor]:
        """The full student's weights on every rank (a collective under ZeRO-3): the export."""


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if torch.is_tensor(v))


class DDPEngine:
    strategy = "ddp"
    shards_parameters = False
    resumes_on_any_world_size = True
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
        return sum(_state_bytes(opt) for opt in self.optimizers.values())

    def local_parameter_count(self) -> int:
        return sum(p.numel() for p in self.distiller.parameters() if p.requires_grad)

    def optimizer_parameter_count(self) -> int:
        """Parameter elements this rank's optimizers update (a tied parameter counts once)."""
        return sum(p.numel() for opt in self.optimizers.values() for group in opt.param_groups for p in group["params"])

    def gradient_bytes(self) -> int:
        """Gradient memory this rank holds (full gradients under DDP; they are freed by the
        optimizer step, so this is the peak between backward and step)."""
        return sum(p.numel() * p.element_size() for p in self.distiller.parameters() if p.requires_grad)

    # -- checkpoints (see kdscale.runtime.checkpoint) ---------------------------------
    def state_for_checkpoint(self) -> dict:
        return {"model": self.distiller.state_dict(),
                "optimizers": {phase: opt.state_dict() for phase, opt in self.optimizers.items()}}

    def write_checkpoint(self, run_dir: str, meta: dict, step: int, keep: int) -> None:
        """One file, written by rank 0 (every rank holds the same weights)."""
        if self.ctx.is_main:
            ckpt.save_checkpoint(run_dir, {**self.state_for_checkpoint(), **meta}, step, keep)
        self.ctx.barrier()

    def restore(self, path: str, state: dict) -> None:
        self.distiller.load_state_dict(state["model"])
        for phase, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][phase])

    def gathered_student_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.distiller.student.state_dict().items()}


class DeepSpeedEngine:
    shards_parameters = False
    resumes_on_any_world_size = False  # DeepSpeed's shards fit the world size that wrote them
    counts_accumulation_itself = True

    def __init__(self, distiller: Distiller, cfg: ExperimentConfig, ctx: DistContext, stage: int, ds_config: dict):
        import deepspeed

        self.distiller, self.ctx, self.cfg, self.stage = distiller, ctx, cfg, stage
        self.strategy = f"zero{stage}"
        self.shards_parameters = stage == 3
        self.phases = distiller.phases()
        ctx.ensure_process_group()
        deepspeed.init_distributed(dist_backend="nccl" if ctx.device.type == "cuda" else "gloo")
        self.engines, self.lr_scales = {}, {}
        for name, phase in self.phases.items():
            groups = phase.param_groups()
            self.lr_scales[name] = [g["lr_scale"] for g in groups]
            optimizer = build_optimizer(groups, cfg.optim)
            self.engines[name], *_ = deepspeed.initialize(model=phase.module, optimizer=optimizer,
                                                          config=dict(ds_config))

    def micro_step(self, phase: str, images, targets, teacher_output, sync: bool, lr: float, autocast,
                   proceed=None, sample_indices=None):
        """As :meth:`DDPEngine.micro_step`; a "no" from ``proceed`` skips DeepSpeed's backward
        and step alike (so it needs ``grad_accum_steps=1``)."""
        proceed = proceed or (lambda loss: all_finite(loss, self.ctx))
        engine = self.engines[phase]
        with autocast():
            if len(self.phases) == 1:
                _logits, losses = engine(images, targets, teacher_output, phase=phase, sample_indices=sample_indices)
            else:  # the phase's engine owns only its module; the Distiller routes the phase
                _logits, losses = self.distiller(images, targets, teacher_output, phase=phase,
                                                 sample_indices=sample_indices)
            loss = sum(losses.values())
        if not proceed(loss):
            return losses, False
        engine.backward(loss)  # DeepSpeed scales by 1/accumulation and steps at the boundary
        for group, scale in zip(engine.optimizer.param_groups, self.lr_scales[phase]):
            group["lr"] = lr * scale
        engine.step()
        return losses, True

    def optimizer_state_bytes(self) -> int:
        return sum(_state_bytes(engine.optimizer.optimizer) for engine in self.engines.values())

    def local_parameter_count(self) -> int:
        params = [p for p in self.distiller.parameters() if p.requires_grad]
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)

    def optimizer_parameter_count(self) -> int:
        """fp32 parameter elements this rank's optimizer partition updates (ZeRO-1/2: the flat
        partitions, padding included; ZeRO-3: the partitioned groups)."""
        total = 0
        for engine in self.engines.values():
            optimizer = engine.optimizer
            groups = optimizer.fp32_partitioned_groups_flat if self.stage == 3 else \
                optimizer.single_partition_of_fp32_groups
            total += sum(t.numel() for t in groups)
        return total

    def gradient_bytes(self) -> int:
        """Gradient memory this rank keeps for its optimizer: full fp32 gradients under
        ZeRO-1, the rank's partition under ZeRO-2/3."""
        total = 0
        for engine in self.engines.values():
            if self.stage == 1:
                total += sum(p.numel() * 4 for p in engine.module.parameters() if p.requires_grad)
            else:
                total += sum(t.numel() * t.element_size()
                             for t in engine.optimizer.single_partition_of_fp32_groups) if self.stage == 2 else \
                    sum(t.numel() * t.element_size() for t in engine.optimizer.fp32_partitioned_groups_flat)
        return total

    def save_sharded(self, directory: str) -> None:
        """Every rank writes its shards of every engine (a collective)."""
        for phase, engine in self.engines.items():
            engine.save_checkpoint(directory, tag=phase)

    def write_checkpoint(self, run_dir: str, meta: dict, step: int, keep: int) -> None:
        """A directory of every rank's shards plus the metadata (a collective)."""
        meta = {**meta, "buffers": {name: b.detach().cpu() for name, b in self.distiller.named_buffers()}}
        ckpt.save_sharded_checkpoint(run_dir, self.save_sharded, meta, step, keep, self.ctx)

    def restore(self, path: str, state: dict) -> None:
        for phase, engine in self.engines.items():
            loaded, _ = engine.load_checkpoint(path, tag=phase, load_module_strict=True,
                                               load_optimizer_states=True, load_lr_scheduler_states=False)
            if loaded is None:
                raise RuntimeError(f"DeepSpeed found no checkpoint for {phase!r} in {path}")
        for name, buffer in self.distiller.named_buffers():
            buffer.copy_(state["buffers"][name])

    def gathered_student_state(self) -> dict[str, torch.Tensor]:
        """The full student on every rank (gathers ZeRO-3 partitions; a collective)."""
        student = self.distiller.student
        if self.stage != 3:
            return {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone().contiguous() for k, v in student.state_dict().items()}


def engine_class(strategy: str) -> type:
    """The engine that runs ``strategy`` (for its class-level properties, before building it)."""
    return DDPEngine if strategy == "ddp" else DeepSpeedEngine


def make_engine(strategy: str, distiller: Distiller, cfg: ExperimentConfig, ctx: DistContext, autocast_dtype=None):
    """``autocast_dtype``: the run's autocast dtype (None: fp32), which DeepSpeed's engines must
    be told (:func:`kdscale.runtime.device.autocast_section`)."""
    if strategy == "ddp":
        return DDPEngine(distiller, cfg, ctx)
    from kdscale.dist.deepspeed_config import build_deepspeed_config

    stage = int(strategy[-1])
    return DeepSpeedEngine(distiller, cfg, ctx, stage,
                           build_deepspeed_config(cfg, stage, ctx.world_size, autocast_dtype))
