"""``sokd``: semi-online KD, Liu, Liu & Huang, BMVC 2021 (arXiv:2111.11747; code:
github.com/swlzq/Semi-Online-KD).

A trainable knowledge bridge module (KBM) hangs on the frozen teacher: a randomly
initialised copy of the teacher's last stage (with its own BN and FC) fed with the
teacher's detached second-to-last stage output. It learns from both the teacher and the
student; the student learns only from the KBM (never from the teacher's logits)::

    L_A = CE(z_A, y) + T^2 KL(p_T^T || p_A^T) + T^2 KL(sg(p_S^T) || p_A^T)
    L_S = CE(z_S, y) + T^2 KL(sg(p_A^T) || p_S^T)

One backward pass on ``L_A + L_S`` and one optimizer step; ``T = 4``, all weights 1.

Choices:
- The frozen teacher stays in **eval** mode (deviates from the code, on purpose). The
  authors' code leaves it in train mode, so its BN layers normalise with each batch's
  statistics and their running statistics drift; the paper describes a fixed teacher, which
  kdscale keeps. The code's form is not offered: kdscale's frozen teachers run outside the
  method under ``inference_mode``, shared with evaluation and teacher-output shards, and a
  teacher whose statistics change would have to join the checkpoint for exact resume and
  differ between ranks under DDP. What the code's mode changes in the loss is only that the
  teacher's logits and bridge input use batch statistics (WRN's dropout is 0).
- ``bridge_input`` defaults to the teacher's second-to-last residual stage; ``bridge_layers``
  to its last stage plus the BN/ReLU that follow it (WRN: ``block3, bn1, relu``; ResNet:
  ``layer3`` or ``layer4``). The copies are re-initialised as the authors' ``models/wrn.py``
  initialises its auxiliary block: conv normal(0, sqrt(2/n)), n = k*k*out_channels; BN
  1 and 0; linear bias 0 (verified).
- The KBM branch is evaluated as ``val/kbm_top1`` (the paper's "improved teacher").
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from kdscale.errors import KdscaleError
from kdscale.methods.base import Distiller, TeacherNeeds, register_method
from kdscale.methods.losses import cross_entropy, soft_kl
from kdscale.models.features import check_layer_paths, feature_shapes, residual_stages

_HEAD_TYPES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Linear, nn.Flatten, nn.Dropout)


def default_bridge(teacher: nn.Module) -> tuple[str, list[str]]:
    stages = residual_stages(teacher, "method.bridge_layers")
    children = list(teacher.named_children())
    names = [name for name, _ in children]
    layers = [stages[-1]]
    if stages[-1] in names:
        for name, module in children[names.index(stages[-1]) + 1:]:
            if isinstance(module, _HEAD_TYPES):
                break
            layers.append(name)
    return stages[-2], layers


def build_bridge(teacher: nn.Module, input_layer: str, layers: list[str], num_classes: int,
                 image_size: int) -> nn.Sequential:
    modules = check_layer_paths(teacher, layers, where="method.bridge_layers (teacher)")
    body = nn.Sequential(*(copy.deepcopy(modules[name]) for name in layers))
    if any(t.is_meta for t in itertools.chain(body.parameters(), body.buffers())):
        body = _materialize(body)  # a ZeRO-3 teacher's shape twin (kdscale.teachers.partitioned)
    for module in body.modules():
        module._forward_hooks.clear()
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    body.requires_grad_(True)
    input_shape = feature_shapes(teacher, [input_layer], image_size, where="method.bridge_input (teacher)",
                                 frozen=True)[input_layer]
    try:
        with torch.no_grad():
            channels = body.eval()(torch.zeros(1, *input_shape)).shape[1]
    except RuntimeError as err:
        raise KdscaleError(f"method.bridge_layers {layers} do not accept the output of method.bridge_input "
                           f"{input_layer!r} (shape {tuple(input_shape)}): {str(err).splitlines()[0]}") from None
    bridge = nn.Sequential(body.train(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    wrn_init(bridge)
    return bridge


def _materialize(body: nn.Module) -> nn.Module:
    """Real (CPU) tensors for a bridge copied from a ``meta`` shape twin. Every copied layer is
    re-initialised below, so no teacher value is lost; a layer that holds its own tensors but
    cannot re-initialise them would keep the teacher's values, which a twin does not have."""
    for name, module in body.named_modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if own and not hasattr(module, "reset_parameters"):
            raise KdscaleError(f"method.bridge_layers: the bridge copies {name} ({type(module).__name__}) from the "
                               f"teacher with its values, which a ZeRO-3-sharded teacher does not hold whole; "
                               f"use distributed.teacher_sharding=replicated for this teacher")
    return body.to_empty(device="cpu")


def wrn_init(module: nn.Module) -> None:
    """The WRN initialisation of the authors' ``models/wrn.py``: conv weights
    normal(0, sqrt(2 / (k * k * out_channels))), BN weight 1 and bias 0, linear bias 0
    (linear weights keep PyTorch's default)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


@register_method
class SOKD(Distiller):
    name = "sokd"
    paper = "Liu et al. 2021, semi-online KD"
    description = "Semi-online KD: a trainable bridge on a frozen teacher teaches the student and learns from it."
    teacher_role = "frozen"

    @dataclass
    class Params:
        temperature: float = field(default=4.0, metadata={"gt": 0})
        ce_weight: float = field(default=1.0, metadata={"ge": 0})
        kd_weight: float = field(default=1.0, metadata={"ge": 0})
        kbm_ce_weight: float = field(default=1.0, metadata={"ge": 0})
        kbm_teacher_weight: float = field(default=1.0, metadata={"ge": 0})
        kbm_student_weight: float = field(default=1.0, metadata={"ge": 0})
        bridge_input: str = ""
        bridge_layers: list[str] = field(default_factory=list)

    def __init__(self, student, params, context):
        super().__init__(student, params, context)
        default_input, default_layers = default_bridge(context.frozen_teacher)
        self.bridge_input = params.bridge_input or default_input
        self.kbm = build_bridge(context.frozen_teacher, self.bridge_input, params.bridge_layers or default_layers,
                                context.num_classes, context.image_size)

    def teacher_needs(self):
        return TeacherNeeds(logits=True, features=(self.bridge_input,))

    def _bridge_input(self, teacher_output) -> torch.Tensor:
        """The teacher's feature in the bridge's dtype: a bf16-autocast teacher hands over bf16
        maps, and the trained bridge's weights are fp32 (autocast casts back down inside it)."""
        return teacher_output.features[self.bridge_input].to(self.kbm[-1].weight.dtype)

    def forward_train(self, images, targets, teacher_output, phase="all"):
        p, t = self.params, self.params.temperature
        kbm_logits = self.kbm(self._bridge_input(teacher_output).detach())
        logits = self.student(images)
        teacher_logits = teacher_output.logits.detach()
        return logits, {
            "kbm_ce": p.kbm_ce_weight * cross_entropy(kbm_logits, targets, self.label_smoothing),
            "kbm_kd_teacher": p.kbm_teacher_weight * soft_kl(teacher_logits, kbm_logits, t),
            "kbm_kd_student": p.kbm_student_weight * soft_kl(logits.detach(), kbm_logits, t),
            "ce": p.ce_weight * cross_entropy(logits, targets, self.label_smoothing),
            "kd": p.kd_weight * soft_kl(kbm_logits.detach(), logits, t),
        }

    def evaluation_logits(self, images, teacher_output=None):
        out = {"student": self.student(images)}
        if teacher_output is not None:
            out["kbm"] = self.kbm(self._bridge_input(teacher_output))
        return out
