"""``at``: attention transfer, Zagoruyko & Komodakis, "Paying More Attention to
Attention", ICLR 2017 (code: github szagoruyko/attention-transfer).

Terms, with ``q = normalize(flatten(mean_c A^2))`` per sample:

- ``ce = ce_weight * CE(z_S, y)``; verified (the code's CE with weight 1).
- ``at = beta * sum_j mean_{batch, positions} (q_S^j - q_T^j)^2``, ``beta = 1e3``; verified:
  ``cifar.py`` (``opt.beta * sum(loss_groups)``) and ``utils.py`` (``at_loss``), the same as
  RepDistiller (``-b 1000``) and torchdistill (``mode: code``). No factor 1/2.

Choices:
- ``mode: paper`` is Eq. 2 of the paper instead, ``beta/2 * sum_j mean_batch
  ||q_S^j - q_T^j||_2`` (the norm itself, not its square); verified from the paper.
- Layers default to the residual stages of both networks (e.g. WRN ``block1..3``, ResNet
  ``layer1..4``), paired by position; WRN stage outputs are pre-activation, as in the
  authors' code (their group outputs). Inferred for other architectures.
- A student map of another spatial size is resized to the teacher's (bilinear); inferred
  (RepDistiller average-pools the larger map instead). Maps have no channel dimension, so
  no parameters are needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kdscale.methods.attention import AttentionToTeacher
from kdscale.methods.base import Distiller, TeacherNeeds, register_method
from kdscale.methods.losses import cross_entropy


@register_method
class AT(Distiller):
    name = "at"
    paper = "Zagoruyko & Komodakis 2017, attention transfer"
    description = "Attention transfer: match normalised spatial attention maps of a frozen teacher."
    teacher_role = "frozen"

    @dataclass
    class Params:
        beta: float = field(default=1000.0, metadata={"ge": 0})
        ce_weight: float = field(default=1.0, metadata={"ge": 0})
        mode: Literal["code", "paper"] = "code"
        student_layers: list[str] = field(default_factory=list)
        teacher_layers: list[str] = field(default_factory=list)

    def __init__(self, student, params, context):
        super().__init__(student, params, context)
        self.attention = AttentionToTeacher(student, context.frozen_teacher, params.student_layers,
                                                 params.teacher_layers, context.image_size)

    def teacher_needs(self):
        return TeacherNeeds(features=tuple(self.attention.teacher_layers))

    def forward_train(self, images, targets, teacher_output, phase="all"):
        p = self.params
        logits = self.student(images)
        return logits, {
            "ce": p.ce_weight * cross_entropy(logits, targets, self.label_smoothing),
            "at": self.attention.loss(teacher_output.features, p.beta, p.mode),
        }
