"""The base class of the feature methods that read a frozen teacher's layers (FitNet, RKD,
PKT, SP, and CRD and ReviewKD): :class:`FeatureDistiller`, the CE and optional KD terms
around a method's terms on its :class:`~kdscale.methods.layer_pairs.FeaturePairs`.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kdscale.methods.base import Distiller, TeacherNeeds
from kdscale.methods.layer_pairs import DefaultLayer, FeaturePairs
from kdscale.methods.losses import cross_entropy, soft_kl


class FeatureDistiller(Distiller):
    """Base of the feature methods that read a frozen teacher's layers (FitNet, RKD, PKT, SP)::

        ce = ce_weight * CE(z_S, y)
        <the method's terms on the paired layers>
        kd = kd_weight * T^2 KL(p_T^T || p_S^T)    (only when kd_weight > 0: RepDistiller's -a)

    A subclass states its ``Params`` (``ce_weight``, ``kd_weight``, ``temperature``, and either
    ``student_layer`` / ``teacher_layer`` strings or, with ``single_layer = False``,
    ``student_layers`` / ``teacher_layers`` lists; empty takes ``default_layer``), its
    ``default_layer`` (a :data:`DefaultLayer`, wrapped in ``staticmethod``) and
    :meth:`feature_terms`. ``self.features`` holds the pairs; the teacher is asked for their
    features, and for its logits when ``kd_weight > 0``."""

    teacher_role = "frozen"
    default_layer: ClassVar[DefaultLayer]
    single_layer: ClassVar[bool] = True

    def __init__(self, student, params, context):
        super().__init__(student, params, context)
        if self.single_layer:
            layers = ([params.student_layer] if params.student_layer else [],
                      [params.teacher_layer] if params.teacher_layer else [])
        else:
            layers = (params.student_layers, params.teacher_layers)
        self.features = FeaturePairs(student, context.frozen_teacher, *layers, context.image_size,
                                     self.default_layer, key="layer" if self.single_layer else "layers")

    def teacher_needs(self):
        return TeacherNeeds(logits=self.params.kd_weight > 0, features=tuple(self.features.teacher_layers))

    def feature_terms(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The method's weighted terms on the ``(student, detached teacher)`` feature pairs."""
        raise NotImplementedError

    def logit_terms_on(self) -> bool:
        """Whether CE and KD train now (they stay in the graph at weight 0 when not)."""
        return True

    def forward_train(self, images, targets, teacher_output, phase="all", **sample_indices):
        """``sample_indices`` (only for a subclass with ``needs_sample_indices``: CRD) reach
        :meth:`feature_terms` as its keyword."""
        p = self.params
        logits = self.student(images)
        on = self.logit_terms_on()
        terms = {"ce": (p.ce_weight if on else 0.0) * cross_entropy(logits, targets, self.label_smoothing),
                 **self.feature_terms(self.features.pairs(teacher_output.features), **sample_indices)}
        if p.kd_weight > 0:
            terms["kd"] = (p.kd_weight if on else 0.0) * soft_kl(teacher_output.logits.detach(), logits,
                                                                   p.temperature)
        return logits, terms
