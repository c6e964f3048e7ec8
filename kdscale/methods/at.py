"""``at``: attention transfer, Zagoruyko & Komodakis, "Paying More Attention to
Attention", ICLR 2017.

``L = ce_weight * CE(z_S, y) + beta/2 * sum_j mean_{batch,positions} (q_S^j - q_T^j)^2``
with ``q = normalize(flatten(mean_c A^2))`` per sample.

Choices where the paper is ambiguous:
- ``mode: code`` (default) averages over positions as the authors' released code does,
  which is what the published ``beta = 1e3`` goes with; ``mode: paper`` sums over
  positions as Eq. 2 reads (the code form times H*W).
- Layers default to the residual stages of both networks (e.g. WRN ``block1..3``, ResNet
  ``layer1..4``), paired by position; WRN stage outputs are pre-activation, as in the
  authors' code.
- A student map of another spatial size is resized to the teacher's (bilinear); this
  needs no parameters since attention maps have no channel dimension.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kdscale.methods.attention import StudentTeacherAttention
from kdscale.methods.base import Distiller, register_method
from kdscale.methods.losses import cross_entropy


@register_method
class AT(Distiller):
    name = "at"
    description = "Attention transfer: match normalised spatial attention maps of a frozen teacher."
    teacher_role = "frozen"
    teacher_outputs = ("features",)

    @dataclass
    class Params:
        beta: float = 1000.0
        ce_weight: float = 1.0
        mode: Literal["code", "paper"] = "code"
        student_layers: list[str] = field(default_factory=list)
        teacher_layers: list[str] = field(default_factory=list)

    def __init__(self, student, params, ctx):
        super().__init__(student, params, ctx)
        self.attention = StudentTeacherAttention(student, ctx.teacher, params.student_layers,
                                                 params.teacher_layers, ctx.image_size)

    def teacher_feature_layers(self):
        return self.attention.teacher_layers

    def forward_train(self, images, targets, teacher_output):
        p = self.params
        logits = self.student(images)
        return logits, {
            "ce": p.ce_weight * cross_entropy(logits, targets, self.label_smoothing),
            "at": self.attention.loss(teacher_output.features, p.beta, p.mode),
        }
