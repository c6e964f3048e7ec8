"""DeepSpeed ZeRO stage 1, 2 or 3 over every trainable network: one DeepSpeed engine over the
whole Distiller, or one per phase module (ProKT), each with its own optimizer; checkpoints
are DeepSpeed's sharded ones and resume on the same number of ranks."""

from __future__ import annotations

import torch

from kdscale.config.schema import ExperimentConfig
from kdscale.engines.protocol import all_finite, state_bytes
from kdscale.methods import Distiller
from kdscale.parallel.context import DistContext, init_deepspeed_comm
from kdscale.runtime.optim import build_optimizer


class DeepSpeedEngine:
    shards_parameters = False
    resumes_on_any_world_size = False  # DeepSpeed's shards fit the world size that wrote them
    sharded_checkpoints = True
    counts_accumulation_itself = True

    def __init__(self, distiller: Distiller, cfg: ExperimentConfig, ctx: DistContext, stage: int, ds_config: dict):
        import deepspeed

        self.distiller, self.ctx, self.cfg, self.stage = distiller, ctx, cfg, stage
        self.strategy = f"zero{stage}"
        self.shards_parameters = stage == 3
        self.phases = distiller.phases()
        ctx.ensure_process_group()
        init_deepspeed_comm(ctx.device)
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
        return sum(state_bytes(engine.optimizer.optimizer) for engine in self.engines.values())

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

    def checkpoint_state(self) -> dict:
        """What the shards do not hold: the Distiller's buffers (BN statistics)."""
        return {"buffers": {name: b.detach().cpu() for name, b in self.distiller.named_buffers()}}

    def write_shards(self, directory: str) -> None:
        """Every rank writes its shards of every engine (a collective)."""
        for phase, engine in self.engines.items():
            engine.save_checkpoint(directory, tag=phase)

    def load_checkpoint(self, path: str, state: dict) -> None:
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
