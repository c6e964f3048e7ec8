"""``ctkd``: **collaborative teaching** KD, Zhao, Sun, Dong, Chen & Dong, "Highlight Every
Step: Knowledge Distillation via Collaborative Teaching", arXiv:1907.09643, IEEE Trans.
Cybernetics 2020 (code: github HaoranZhao1988/CTKD, ``train.py``, derived from Rocket
Launching). Not *Curriculum Temperature* KD, which mdistiller also calls CTKD.

Two teachers: a **scratch teacher** R trains from scratch beside the student S, and the two
are branches that share the stem; a frozen **expert teacher** E guides through attention.
One optimizer steps both branches on the sum of the terms:

- ``scratch_ce = CE(z_R, y)`` and ``ce = CE(z_S, y)``; verified (``train.py``).
- ``hint = gamma * sum_classes (sg(z_R) - z_S)^2 / B`` (``hint: mse_sum``); verified
  (``train.py``: the squared error summed over classes, over the batch size; the scratch
  logits detached, ``--grad_block``). ``hint: kl`` uses ``gamma * T^2 KL(sg(p_R^T) || p_S^T)``
  instead (an option, not the code).
- ``at_scratch = beta * sum_j at(R_j, E_j)`` (AT code form, no 1/2); verified: the code
  zips the feature list ``[R_0, R_1, R_2, S_0, S_1, S_2]`` with the expert's
  ``[E_0, E_1, E_2]``, so the expert's attention reaches the **scratch teacher's** groups,
  and the student only through the shared stem.

Choices, each configurable:
- ``at_target``: ``scratch`` (default, the code), ``student`` (as the abstract reads: the
  expert guides the student; term ``at_student``), or ``both``.
- ``share_stem: true`` (verified: one ``conv0`` for both branches): the student's stem
  (the modules before its first residual stage) is the scratch teacher's too, one set of
  parameters; BN running statistics stay per branch. The stems must have the same
  parameter shapes (otherwise a clear error); ``false`` gives two separate networks. The
  code's ``--param_share`` (student blocks = the first blocks of R's groups) is not offered.
- ``gamma = 0.03`` and ``beta = 1e3`` (inferred: the code defaults both to 0; these are the
  values of Rocket Launching's README runs). ``T = 4`` for ``hint: kl`` (the code's
  default temperature, used there only for a logged KL to the expert, not trained on).
- The scratch teacher's architecture is the expert's unless ``scratch_teacher`` names
  another (the code: ``--depth``); AT layers default to the residual stages, paired by
  position, maps resized to the expert's size (as in ``at``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kdscale.methods.attention import AttentionToTeacher
from kdscale.methods.base import Distiller, TeacherNeeds, register_method
from kdscale.methods.losses import cross_entropy, soft_kl
from kdscale.models.sharing import share_stem


@register_method
class CTKD(Distiller):
    name = "ctkd"
    paper = "Zhao et al. 2019, collaborative teaching (not curriculum temperature)"
    description = ("Collaborative teaching (not curriculum temperature): a scratch-teacher branch guides each step, "
                   "a frozen expert guides attention.")
    teacher_role = "frozen"

    @dataclass
    class Params:
        scratch_teacher: str = ""
        gamma: float = field(default=0.03, metadata={"ge": 0})
        hint: Literal["mse_sum", "kl"] = "mse_sum"
        temperature: float = field(default=4.0, metadata={"gt": 0})
        beta: float = field(default=1000.0, metadata={"ge": 0})
        at_mode: Literal["code", "paper"] = "code"
        at_target: Literal["scratch", "student", "both"] = "scratch"
        share_stem: bool = True
        ce_weight: float = field(default=1.0, metadata={"ge": 0})
        scratch_ce_weight: float = field(default=1.0, metadata={"ge": 0})
        student_layers: list[str] = field(default_factory=list)
        scratch_layers: list[str] = field(default_factory=list)
        teacher_layers: list[str] = field(default_factory=list)

    def __init__(self, student, params, context):
        super().__init__(student, params, context)
        self.scratch_teacher = context.build_model(params.scratch_teacher or context.teacher_name)
        self.shared_stem = share_stem(student, self.scratch_teacher, "student", "scratch teacher") \
            if params.share_stem else []
        self.attention = {}
        if params.at_target in ("scratch", "both"):
            self.attention["at_scratch"] = AttentionToTeacher(self.scratch_teacher, context.frozen_teacher,
                                                              params.scratch_layers, params.teacher_layers,
                                                              context.image_size, "scratch")
        if params.at_target in ("student", "both"):
            self.attention["at_student"] = AttentionToTeacher(student, context.frozen_teacher, params.student_layers,
                                                              params.teacher_layers, context.image_size, "student")

    def teacher_needs(self):
        return TeacherNeeds(features=tuple(next(iter(self.attention.values())).teacher_layers))

    def forward_train(self, images, targets, teacher_output, phase="all"):
        p = self.params
        scratch_logits = self.scratch_teacher(images)
        logits = self.student(images)
        guide = scratch_logits.detach().float()
        if p.hint == "mse_sum":
            hint = (guide - logits.float()).pow(2).sum() / logits.shape[0]
        else:
            hint = soft_kl(guide, logits, p.temperature)
        terms = {
            "scratch_ce": p.scratch_ce_weight * cross_entropy(scratch_logits, targets, self.label_smoothing),
            "ce": p.ce_weight * cross_entropy(logits, targets, self.label_smoothing),
            "hint": p.gamma * hint,
        }
        for name, attention in self.attention.items():
            terms[name] = attention.loss(teacher_output.features, p.beta, p.at_mode)
        return logits, terms

    def evaluation_logits(self, images, teacher_output=None):
        logits = {"student": self.student(images), "scratch_teacher": self.scratch_teacher(images)}
        for attention in self.attention.values():
            attention.taps.pop()  # evaluation computes no AT; drop what the taps recorded
        return logits
