"""Frozen teachers: inference-only networks kept outside the trained module.

A frozen teacher is never a child of the Distiller, so no optimizer, DDP bucket or ZeRO
partition holds its parameters. It runs in eval mode under ``torch.inference_mode`` (bf16
autocast on GPU), channels-last where that helps, with ``requires_grad_(False)``; its BN
statistics therefore never change. Features the method asks for are tapped with forward
hooks on module paths; feature targets (a teacher entry's ``targets``: summary and spatial
features, :mod:`kdscale.models.feature_targets`) come back under ``member_features[""]``, the
source filing them under the teacher's id.

Each call first maps the batch to the teacher's own view (``view``: its mean, std and input
size; :mod:`kdscale.teachers.views`), so training, evaluation and ``kdscale.teach`` show it
the same pixels. The default, the identity, passes the batch through untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from kdscale.methods.base import TeacherOutput
from kdscale.models.feature_targets import FeatureTargets
from kdscale.models.features import FeatureTaps
from kdscale.parallel.context import init_deepspeed_comm
from kdscale.runtime.device import autocast
from kdscale.teachers.partitioned import is_partitioned
from kdscale.teachers.views import TeacherView


def zero3_teacher_config(micro_batch: int, autocast_dtype: torch.dtype | None = None) -> dict:
    """DeepSpeed ZeRO-3 parameter partitioning for a frozen teacher: no optimizer, no gradients,
    and the run's autocast (DeepSpeed would turn it off inside its engine otherwise)."""
    from kdscale.runtime.device import autocast_section

    return {"train_micro_batch_size_per_gpu": micro_batch, "zero_optimization": {"stage": 3},
            "steps_per_print": 10**9, "torch_autocast": autocast_section(autocast_dtype)}


class FrozenTeacher:
    """Runs the frozen teacher on this rank's micro-batch.

    ``sharding="replicated"``: a full replica per rank (data-parallel inference).
    ``sharding="zero3"``: the parameters are partitioned across ranks by a DeepSpeed ZeRO-3
    engine without optimizer (after DeepSpeed-Chat's frozen reference model); each forward
    gathers them, so every rank must make the same calls (``lockstep``). ``model`` may come
    whole (DeepSpeed partitions it) or already partitioned
    (:func:`kdscale.teachers.partitioned.build_partitioned`, what training does).
    ``view``: maps the loader's batch to the teacher's input (None: the batch as it is).
    """

    def __init__(self, model: nn.Module, feature_layers: list[str], device: torch.device,
                 autocast_dtype: torch.dtype | None, channels_last: bool, sharding: str = "replicated",
                 micro_batch: int = 1, compile: bool = False, view: TeacherView | None = None,
                 targets: FeatureTargets | None = None):
        self.view, self.targets = view, targets
        self.model = model.eval().requires_grad_(False)
        if is_partitioned(model):  # built under zero.Init (teachers.partitioned): its partitions are placed
            for module in model.modules():
                for name, buffer in module.named_buffers(recurse=False):
                    setattr(module, name, buffer.to(device))
        else:
            self.model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        self.device, self.autocast_dtype = device, autocast_dtype
        self.lockstep = sharding == "zero3"
        # Taps go on before DeepSpeed wraps the model; ZeRO-3 keeps the module structure.
        self.taps = FeatureTaps(self.model, feature_layers, where="teacher", copy=True) if feature_layers else None
        if compile:  # in place, after the taps (train.compile; never with ZeRO-3, checked in setup)
            self.model.compile()
        self.engine = None
        if self.lockstep:
            import deepspeed

            init_deepspeed_comm(device)
            self.engine, *_ = deepspeed.initialize(model=self.model, config=zero3_teacher_config(micro_batch, autocast_dtype))
            self.engine.eval()
            if self.targets is not None:
                self.targets.call = self.engine

    def local_parameter_count(self) -> int:
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in self.model.parameters())

    def _autocast(self):
        return autocast(self.device, self.autocast_dtype)

    def __call__(self, images: torch.Tensor) -> TeacherOutput:
        # ZeRO-3 swaps parameter storage in its hooks, which inference mode forbids.
        grad_mode = torch.no_grad() if self.lockstep else torch.inference_mode()
        with grad_mode:
            if self.view is not None:
                images = self.view(images)  # float32, outside autocast
            with self._autocast():
                targets = {}
                if self.targets is not None:
                    logits, targets = self.targets(images)
                else:
                    logits = self.engine(images) if self.engine is not None else self.model(images)
                features = self.taps.pop() if self.taps else {}
        # Inference tensors cannot be saved for backward; plain copies can (cheap: logits
        # and a few feature maps).
        output = TeacherOutput(logits.clone() if logits is not None else None,
                               {k: v.clone() for k, v in features.items()})
        if targets:
            output.member_features = {"": {k: v.clone() for k, v in targets.items()}}
        return output
