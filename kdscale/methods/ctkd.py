"""``ctkd``: collaborative teaching KD, Zhao, Sun, Dong, Chen & Dong, "Highlight Every
Step: Knowledge Distillation via Collaborative Teaching", arXiv:1907.09643 (2019).

Two teachers: a **scratch teacher** R trains from scratch beside the student and guides it
step by step along its path; a frozen **expert teacher** E guides it through attention::

    L_R = CE(z_R, y)
    L_S = ce_weight * CE(z_S, y) + alpha * T^2 KL(sg(p_R^T) || p_S^T) + AT(S, E)
    total = L_S + L_R      (one optimizer step for S and R)

Inferred, since neither code nor the full text was available (see the project's method
notes): the loss combination above, the defaults T=4, alpha=0.9, beta=1e3, and the
scratch teacher's architecture (the expert's unless ``scratch_teacher`` names another).
``path_loss: mse`` replaces the KL path term by the MSE between logits (the "rocket
launching" hint form, ``alpha * mean (z_S - sg(z_R))^2``). AT is computed as in ``at``
(code form, residual stages, student maps resized to the teacher's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch.nn.functional as F

from kdscale.methods.attention import StudentTeacherAttention
from kdscale.methods.base import Distiller, register_method
from kdscale.methods.losses import cross_entropy, soft_kl


@register_method
class CTKD(Distiller):
    name = "ctkd"
    description = "Collaborative teaching: a scratch teacher guides each step, a frozen expert guides attention."
    teacher_role = "frozen"
    teacher_outputs = ("features",)
    trainable_networks = ("student", "scratch_teacher")

    @dataclass
    class Params:
        scratch_teacher: str = ""
        temperature: float = 4.0
        alpha: float = 0.9
        path_loss: Literal["kl", "mse"] = "kl"
        beta: float = 1000.0
        at_mode: Literal["code", "paper"] = "code"
        ce_weight: float = 1.0
        scratch_ce_weight: float = 1.0
        student_layers: list[str] = field(default_factory=list)
        teacher_layers: list[str] = field(default_factory=list)

    def __init__(self, student, params, ctx):
        super().__init__(student, params, ctx)
        self.scratch_teacher = ctx.build_model(params.scratch_teacher or ctx.teacher_name)
        self.attention = StudentTeacherAttention(student, ctx.teacher, params.student_layers,
                                                 params.teacher_layers, ctx.image_size)

    def teacher_feature_layers(self):
        return self.attention.teacher_layers

    def forward_train(self, images, targets, teacher_output):
        p = self.params
        scratch_logits = self.scratch_teacher(images)
        logits = self.student(images)
        guide = scratch_logits.detach()
        if p.path_loss == "kl":
            path = soft_kl(guide, logits, p.temperature)
        else:
            path = F.mse_loss(logits.float(), guide.float())
        return logits, {
            "scratch_ce": p.scratch_ce_weight * cross_entropy(scratch_logits, targets, self.label_smoothing),
            "ce": p.ce_weight * cross_entropy(logits, targets, self.label_smoothing),
            "path": p.alpha * path,
            "at": self.attention.loss(teacher_output.features, p.beta, p.at_mode),
        }

    def evaluation_logits(self, images, teacher_output=None):
        return {"student": self.student(images), "scratch_teacher": self.scratch_teacher(images)}
