"""Attention transfer from a frozen teacher to a trained network (AT, CTKD).

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


class AttentionToTeacher:
    """Taps ``network``'s layers and computes the AT term against the frozen teacher's.

    ``role`` names the network in errors and in the config keys: ``method.<role>_layers``.
    """

    def __init__(self, network: nn.Module, teacher: nn.Module, network_layers: list[str],
                 teacher_layers: list[str], image_size: int, role: str = "student"):
        key = f"method.{role}_layers"
        self.network_layers = list(network_layers) or residual_stages(network, key)
        self.teacher_layers = list(teacher_layers) or residual_stages(teacher, "method.teacher_layers")
        if len(self.network_layers) != len(self.teacher_layers):
            raise KdscaleError(
                f"attention transfer pairs {role} layers {self.network_layers} with teacher layers "
                f"{self.teacher_layers}, which differ in number; set {key} and method.teacher_layers to lists "
                f"of the same length")
        feature_shapes(network, self.network_layers, image_size, where=f"{key} ({role})")
        feature_shapes(teacher, self.teacher_layers, image_size, where="method.teacher_layers (teacher)", frozen=True)
        self.taps = FeatureTaps(network, self.network_layers, where=role)

    def loss(self, teacher_features: dict[str, torch.Tensor], beta: float, mode: str) -> torch.Tensor:
        """AT between the network's last forward and the given (frozen) teacher features."""
        features = self.taps.pop()
        return attention_transfer([features[name] for name in self.network_layers],
                                  [teacher_features[name].detach() for name in self.teacher_layers], beta, mode)
