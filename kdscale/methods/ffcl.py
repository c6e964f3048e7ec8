"""``ffcl``: feature fusion-based collaborative learning, Li, Sun, Gou, Du & Ou, Int. J.
of Distributed Sensor Networks 17(11), 2021 (doi:10.1177/15501477211057037).

Teacher and student train together from scratch and teach each other; their last-stage
features are concatenated into a fused feature map whose classifier carries knowledge
back to both. Only the abstract was available, so the core is FFL (Kim et al. 2019,
"Feature Fusion for Online Mutual Knowledge Distillation"), verified from its code
(github Jangho-Kim/FFL-pytorch: ``train_FFL.py``, ``our_network.py``, ``utils.py``).
With ``T = 3`` and every KL term scaled by ``T^2``, targets detached:

- ``ce``, ``teacher_ce``, ``fused_ce``: CE of the student, the teacher and the fused head
  (``ce_weight``, 1); verified.
- ``fused_to_student``, ``fused_to_teacher``: ``w(e) * KL(sg(p_F) || p_X)``; verified.
- ``ensemble_to_fused``: ``w(e) * KL(sg(softmax(mean(z_S, z_T) / T)) || p_F)``, the softmax
  of the mean of the **logits**; verified.
- ``w(e) = exp(-5 (1 - e / rampup_epochs)^2)`` for the 0-based epoch ``e`` below
  ``rampup_epochs = 80``, then 1; verified (``sigmoid_rampup``). 0 turns it off.
- Fusion module: depthwise 3x3 conv on the concatenated 2C channels + BN + ReLU, 1x1 conv
  2C -> C + BN + ReLU, global average pooling, linear head; verified (``Fusion_module``).
  With unequal widths it reduces to half the concatenated channels (inferred); a larger
  feature map is average-pooled to the smaller size (inferred).
- The fusion module has its own weight decay, ``fusion_weight_decay = 1e-5`` (verified:
  its own SGD); the networks use ``optim.weight_decay``.
- FFL's KL adds 1e-7 to the target probabilities; kdscale does not (a change below 1e-6).

Two networks or one (``share_trunk``):
- ``share_trunk: false`` (default, FFCL): two separate networks, as the seed paper's "the
  teacher and the student networks" reads (inferred from its abstract).
- ``share_trunk: true`` (FFL as its code builds it, verified: ``our_network.py``,
  ``FFL_ResNet``): one network whose two branches share ``conv1``, ``layer1`` and ``layer2``
  and duplicate only the last stage and the classifier; the fusion module takes the two
  branches' last-stage maps. kdscale builds the student and the teacher and makes the
  teacher's trunk (stem + every residual stage but the last) use the student's parameters:
  one set, counted once under DDP and ZeRO, whose gradient sums both branches' paths, as
  the one trunk's does in the code. Each branch keeps its own copy of the trunk's BN running
  statistics; both see the same batch, so they hold the values the one trunk would. The
  trunk is computed twice per forward (about 2/3 of a ResNet's compute: a cost, not a
  change of the math). Both networks must have the same trunk (FFL runs two branches of
  one architecture: ``configs/ffl_cifar100.yaml`` uses resnet32 for both, the code's
  ``--depth 32``); otherwise a one-line error.

FFCL's extras, inferred from its abstract, each behind its own weight (all 0 runs plain
FFL, ``configs/ffl_cifar100.yaml``, which also shares the trunk):
- ``mutual_to_student``, ``mutual_to_teacher``: ``w(e) * mutual_weight * KL(sg(p_T) || p_S)``
  and the reverse (response-based knowledge between the two networks);
- ``at_to_student``, ``at_to_teacher``: AT (code form, ``at_beta``) over the residual
  stages but the last, each network against the other's detached maps (feature-based);
- ``pk_student``, ``pk_teacher``: "positive knowledge", ``pk_weight * KL(q || p_X)`` at T=1
  with a virtual teacher ``q`` that puts ``pk_correct_prob`` on the label and spreads the
  rest evenly (after Yuan et al. 2020).
Fusion gradients flow back into both networks (``detach_fusion_inputs: false``), as in FFL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdscale.methods.base import Distiller, Phase, register_method
from kdscale.methods.losses import (
    attention_transfer,
    cross_entropy,
    soft_kl,
    soft_kl_to_probs,
)
from kdscale.models.features import FeatureTaps, feature_shapes, residual_stages
from kdscale.models.sharing import share_trunk


class FusionModule(nn.Module):
    """Two feature maps -> concatenation -> depthwise 3x3 + BN + ReLU -> 1x1 (halving the
    channels) + BN + ReLU -> global pooling -> fused logits (FFL's ``Fusion_module``)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        reduced = channels // 2
        self.depthwise = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                                       nn.BatchNorm2d(channels), nn.ReLU())
        self.pointwise = nn.Sequential(nn.Conv2d(channels, reduced, 1, bias=False), nn.BatchNorm2d(reduced),
                                       nn.ReLU())
        self.fc = nn.Linear(reduced, num_classes)
        for module in self.modules():  # FFL's init: normal(0, sqrt(2 / (k * k * out_channels)))
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        size = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
        a, b = F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)
        fused = self.pointwise(self.depthwise(torch.cat([a, b], dim=1)))
        return self.fc(fused.mean(dim=(2, 3)))


def sigmoid_rampup(epoch: int, length: float) -> float:
    """``exp(-5 (1 - e / length)^2)`` up to ``length`` epochs, then 1 (Laine & Aila 2017, as in FFL)."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0), length) / length
    return math.exp(-5.0 * phase * phase)


def virtual_teacher(targets: torch.Tensor, num_classes: int, correct_prob: float) -> torch.Tensor:
    """``correct_prob`` on the label, the rest spread evenly; soft (mixed) targets are
    handled linearly: ``q = t * correct_prob + (1 - t) * rest``."""
    soft = F.one_hot(targets, num_classes).float() if targets.dim() == 1 else targets.float()
    rest = (1 - correct_prob) / max(1, num_classes - 1)
    return soft * correct_prob + (1 - soft) * rest


@register_method
class FFCL(Distiller):
    name = "ffcl"
    paper = "Li et al. 2021, feature-fusion collaborative learning"
    description = "Feature-fusion collaborative learning: teacher and student learn together through a fused head."
    teacher_role = "trainable"

    @dataclass
    class Params:
        temperature: float = field(default=3.0, metadata={"gt": 0})
        ce_weight: float = field(default=1.0, metadata={"ge": 0})
        fused_weight: float = field(default=1.0, metadata={"ge": 0})
        ensemble_weight: float = field(default=1.0, metadata={"ge": 0})
        rampup_epochs: float = field(default=80.0, metadata={"ge": 0})
        fusion_weight_decay: Optional[float] = field(default=1e-5, metadata={"ge": 0})
        """None: the networks' ``optim.weight_decay``."""
        mutual_weight: float = field(default=1.0, metadata={"ge": 0})
        at_beta: float = field(default=1000.0, metadata={"ge": 0})
        pk_weight: float = field(default=0.5, metadata={"ge": 0})
        pk_correct_prob: float = field(default=0.9, metadata={"ge": 0, "le": 1})
        detach_fusion_inputs: bool = False
        share_trunk: bool = False

    def __init__(self, student, params, context):
        super().__init__(student, params, context)
        self.teacher = context.trained_teacher.requires_grad_(True)
        self.shared_trunk = share_trunk(student, self.teacher, "student", "teacher") if params.share_trunk else []
        self.num_classes = context.num_classes
        s_stages = residual_stages(student, "student")
        t_stages = residual_stages(self.teacher, "teacher")
        mid = min(len(s_stages), len(t_stages)) - 1
        self.s_layers, self.t_layers = s_stages[-1:], t_stages[-1:]
        self.s_mid, self.t_mid = s_stages[-1 - mid:-1], t_stages[-1 - mid:-1]
        s_shape = feature_shapes(student, self.s_layers, context.image_size, "student")[self.s_layers[0]]
        t_shape = feature_shapes(self.teacher, self.t_layers, context.image_size, "teacher")[self.t_layers[0]]
        self.fusion = FusionModule(s_shape[0] + t_shape[0], context.num_classes)
        self.s_taps = FeatureTaps(student, self.s_mid + self.s_layers, "student")
        self.t_taps = FeatureTaps(self.teacher, self.t_mid + self.t_layers, "teacher")

    def phases(self):
        networks = [p for name, p in self.named_parameters() if not name.startswith("fusion.")]
        fusion = {"params": list(self.fusion.parameters())}
        if self.params.fusion_weight_decay is not None:
            fusion["weight_decay"] = self.params.fusion_weight_decay
        return {"all": Phase(self, groups=[{"params": networks}, fusion])}

    def _fused(self, s_features, t_features):
        s_last, t_last = s_features[self.s_layers[0]], t_features[self.t_layers[0]]
        if self.params.detach_fusion_inputs:
            s_last, t_last = s_last.detach(), t_last.detach()
        return self.fusion(t_last, s_last)

    def forward_train(self, images, targets, teacher_output, phase="all"):
        p, t = self.params, self.params.temperature
        ramp = sigmoid_rampup(self.epoch, p.rampup_epochs)
        z_s, z_t = self.student(images), self.teacher(images)
        s_feat, t_feat = self.s_taps.pop(), self.t_taps.pop()
        z_f = self._fused(s_feat, t_feat)
        ensemble = (z_s.detach().float() + z_t.detach().float()) / 2
        q = virtual_teacher(targets, self.num_classes, p.pk_correct_prob)
        s_mid, t_mid = [s_feat[n] for n in self.s_mid], [t_feat[n] for n in self.t_mid]
        return z_s, {
            "ce": p.ce_weight * cross_entropy(z_s, targets, self.label_smoothing),
            "teacher_ce": p.ce_weight * cross_entropy(z_t, targets, self.label_smoothing),
            "fused_ce": p.ce_weight * cross_entropy(z_f, targets, self.label_smoothing),
            "fused_to_student": ramp * p.fused_weight * soft_kl(z_f.detach(), z_s, t),
            "fused_to_teacher": ramp * p.fused_weight * soft_kl(z_f.detach(), z_t, t),
            "ensemble_to_fused": ramp * p.ensemble_weight * soft_kl(ensemble, z_f, t),
            "mutual_to_student": ramp * p.mutual_weight * soft_kl(z_t.detach(), z_s, t),
            "mutual_to_teacher": ramp * p.mutual_weight * soft_kl(z_s.detach(), z_t, t),
            "at_to_student": attention_transfer(s_mid, [f.detach() for f in t_mid], p.at_beta),
            "at_to_teacher": attention_transfer(t_mid, [f.detach() for f in s_mid], p.at_beta),
            "pk_student": p.pk_weight * soft_kl_to_probs(q, z_s, 1.0),
            "pk_teacher": p.pk_weight * soft_kl_to_probs(q, z_t, 1.0),
        }

    def evaluation_logits(self, images, teacher_output=None):
        z_s, z_t = self.student(images), self.teacher(images)
        return {"student": z_s, "teacher": z_t, "fused": self._fused(self.s_taps.pop(), self.t_taps.pop())}
