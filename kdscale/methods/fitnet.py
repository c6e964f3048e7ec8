"""``fitnet``: Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin
Deep Nets", ICLR 2015; run as in RepDistiller (Tian et al. 2020), whose CIFAR-100 numbers
are the ones users compare against.

A trainable regressor ``r`` maps the student's guided layer to the shape of the teacher's
hint layer; the hint is the squared error between them::

    ce   = ce_weight * CE(z_S, y)
    hint = beta * mean_{batch, channels, positions} (r(F_S) - sg(F_T))^2

Verified (RepDistiller ``train_student.py``, ``helper/loops.py``, ``distiller_zoo/FitNet.py``,
``models/util.py``, ``scripts/run_cifar_distill.sh``):
- **One stage**: CE (``-r``, 1) and ``beta * HintLoss`` (``-b 100``) from the first step,
  ``HintLoss = nn.MSELoss()`` (mean over every element), one SGD over student + regressor.
  kdscale follows this one-stage form by default.
- Hint layer ``--hint_layer 2``: the output of the second residual stage of both networks
  (``layer2`` of the CIFAR ResNets, ``block2`` of the WRNs); ``method.student_layer`` and
  ``method.teacher_layer`` name others.
- Regressor ``ConvReg``: student height twice the teacher's: conv 3x3 stride 2 pad 1; half:
  transposed conv 4x4 stride 2 pad 1; otherwise conv with kernel ``1 + H_S - H_T`` (1x1
  at equal sizes); then BN and ReLU. PyTorch's default initialisation (ConvReg sets none).
- ``kd_weight`` (RepDistiller ``-a``, 0 for FitNet) adds ``T^2 KL(p_T^T || p_S^T)``, T=4.

Options, inferred from the paper's outline (its text was not re-read for this port):
- ``hint_epochs > 0``: the paper's stage-wise training. For the first ``hint_epochs`` epochs
  only the hint trains (the student up to its guided layer, and the regressor); after them
  the regressor is dropped and CE + KD train the student (set ``kd_weight``). The terms
  that are off are kept at weight 0, so every parameter stays in the graph (DDP, ZeRO);
  weight decay still applies to the parameters a stage does not train.
- ``regressor_bn: false``: a conv + ReLU regressor without BN (the paper's convolutional
  regressor as we read it). With BN, the regressor's statistics are per rank, like the
  student's.

The regressor is a child (``self.regressor``): trained, sharded under ZeRO, checkpointed; the
export (``export/student.safetensors``) holds the student alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kdscale.errors import KdscaleError
from kdscale.methods.base import register_method
from kdscale.methods.feature_distiller import FeatureDistiller
from kdscale.methods.layer_pairs import FeaturePairs, second_stage


class ConvRegressor(nn.Module):
    """RepDistiller's ``ConvReg`` from a student map ``(C_S, H_S, W_S)`` to ``(C_T, H_T, W_T)``."""

    def __init__(self, student_shape, teacher_shape, bn: bool = True):
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = tuple(student_shape), tuple(teacher_shape)
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise KdscaleError(f"method.student_layer: a student map of {s_h}x{s_w} cannot be regressed to the "
                               f"teacher's {t_h}x{t_w} (ConvReg takes a student map twice, half, or at least the "
                               f"teacher's size); pick layers whose sizes fit")
        self.bn = nn.BatchNorm2d(t_c) if bn else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def _map_shape(shape, key):
    if len(shape) != 3:
        raise KdscaleError(f"{key}: FitNet regresses feature maps (C, H, W); this layer gives shape {tuple(shape)}")
    return shape


@register_method
class FitNet(FeatureDistiller):
    name = "fitnet"
    paper = "Romero et al. 2015, FitNets (hints)"
    description = "FitNet hints: a trained regressor maps a student stage onto a frozen teacher's stage (MSE)."
    default_layer = staticmethod(second_stage)

    @dataclass
    class Params:
        beta: float = field(default=100.0, metadata={"ge": 0})
        ce_weight: float = field(default=1.0, metadata={"ge": 0})
        kd_weight: float = field(default=0.0, metadata={"ge": 0})
        temperature: float = field(default=4.0, metadata={"gt": 0})
        student_layer: str = ""
        teacher_layer: str = ""
        regressor_bn: bool = True
        hint_epochs: int = field(default=0, metadata={"ge": 0})

    def __init__(self, student, params, context):
        super().__init__(student, params, context)
        s_layer, t_layer = self.hint.student_layers[0], self.hint.teacher_layers[0]
        self.regressor = ConvRegressor(_map_shape(self.hint.student_shapes[s_layer], "method.student_layer"),
                                       _map_shape(self.hint.teacher_shapes[t_layer], "method.teacher_layer"),
                                       bn=params.regressor_bn)
        with torch.no_grad():  # the regressor must land exactly on the teacher's map
            out = self.regressor.eval()(torch.zeros(1, *self.hint.student_shapes[s_layer]))
        self.regressor.train()
        if tuple(out.shape[1:]) != tuple(self.hint.teacher_shapes[t_layer]):
            raise KdscaleError(f"method.student_layer {s_layer!r} {tuple(self.hint.student_shapes[s_layer])} regresses "
                               f"to {tuple(out.shape[1:])}, not the teacher's {t_layer!r} "
                               f"{tuple(self.hint.teacher_shapes[t_layer])}; pick layers whose sizes fit")

    @property
    def hint(self) -> FeaturePairs:
        """The guided (student) and hint (teacher) layers: ``self.features``."""
        return self.features

    def _hint_on(self) -> bool:
        return self.params.hint_epochs == 0 or self.epoch < self.params.hint_epochs

    def logit_terms_on(self) -> bool:
        """Stage-wise (``hint_epochs > 0``): CE and KD only after the hint epochs."""
        return self.epoch >= self.params.hint_epochs

    def feature_terms(self, pairs):
        (fs, ft), = pairs
        beta = self.params.beta if self._hint_on() else 0.0
        return {"hint": beta * F.mse_loss(self.regressor(fs).float(), ft.float())}
