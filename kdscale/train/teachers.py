"""Frozen teachers: inference-only networks kept outside the trained module.

A frozen teacher is never a child of the Distiller, so no optimizer, DDP bucket or ZeRO
partition holds its parameters. It runs in eval mode under ``torch.inference_mode`` (bf16
autocast on GPU), channels-last where that helps, with ``requires_grad_(False)``; its BN
statistics therefore never change. Features the method asks for are tapped with forward
hooks on module paths.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from kdscale.methods.base import TeacherOutput
from kdscale.models.features import FeatureTaps


class FrozenTeacher:
    """Runs a teacher replica on this rank's micro-batch (data-parallel inference)."""

    def __init__(self, model: nn.Module, feature_layers: list[str], device: torch.device,
                 autocast_dtype: torch.dtype | None, channels_last: bool):
        self.model = model.eval().requires_grad_(False)
        self.model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        self.device, self.autocast_dtype = device, autocast_dtype
        self.taps = FeatureTaps(self.model, feature_layers, where="teacher") if feature_layers else None

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def __call__(self, images: torch.Tensor) -> TeacherOutput:
        with torch.inference_mode(), self._autocast():
            logits = self.model(images)
            features = self.taps.pop() if self.taps else {}
        # Inference tensors cannot be saved for backward; plain copies can (cheap: logits
        # and a few feature maps).
        return TeacherOutput(logits.clone(), {k: v.clone() for k, v in features.items()})
