"""Pairing of student and teacher layers for attention-transfer terms (AT, CTKD).

Layers default to the residual stages of each network (``layer1..4``, ``block1..3``); the
two lists pair up by position and must have the same length. Every layer is checked with
a dry forward when the method is built, so a wrong name fails before training.
"""

from __future__ import annotations

import torch
from torch import nn

from kdscale.errors import KdscaleError
from kdscale.methods.losses import attention_transfer
from kdscale.models.features import FeatureTaps, feature_shapes, residual_stages


class StudentTeacherAttention:
    """Taps the student's layers and computes the AT term against the teacher's."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layers: list[str],
                 teacher_layers: list[str], image_size: int):
        self.student_layers = list(student_layers) or residual_stages(student, "method.student_layers")
        self.teacher_layers = list(teacher_layers) or residual_stages(teacher, "method.teacher_layers")
        if len(self.student_layers) != len(self.teacher_layers):
            raise KdscaleError(
                f"attention transfer pairs student layers {self.student_layers} with teacher layers "
                f"{self.teacher_layers}, which differ in number; set method.student_layers and "
                f"method.teacher_layers to lists of the same length")
        feature_shapes(student, self.student_layers, image_size, where="method.student_layers (student)")
        feature_shapes(teacher, self.teacher_layers, image_size, where="method.teacher_layers (teacher)")
        self.taps = FeatureTaps(student, self.student_layers, where="student")

    def loss(self, teacher_features: dict[str, torch.Tensor], beta: float, mode: str) -> torch.Tensor:
        """AT between the student's last forward and the given (frozen) teacher features."""
        student_features = self.taps.pop()
        return attention_transfer([student_features[name] for name in self.student_layers],
                                  [teacher_features[name].detach() for name in self.teacher_layers], beta, mode)
