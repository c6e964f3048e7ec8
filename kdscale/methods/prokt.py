"""``prokt``: progressive knowledge teaching, Shi, Song, Zhou, Li & Li, "Follow Your Path:
a Progressive Method for Knowledge Distillation", ECML-PKDD 2021 (arXiv:2107.09305).

The teacher is projected into the student's reach: it trains too, pulled toward targets
the student can follow. Each iteration, in the order of the authors' code:

1. the student, in eval mode and without gradients, gives ``sg(z_S)``;
2. teacher step: ``L_T = (1 - lam) * CE(z_T, y) + lam * KL(p_S || p_T)``;
3. the *updated* teacher, in eval mode without gradients, gives ``sg(z_T)``;
4. student step: ``L_S = kl_weight * KL(p_T || p_S) + ce_weight * CE(z_S, y)``.

Two optimizer steps per iteration (phases ``teacher`` then ``student``); the trainer
steps between them, so step 3 sees the updated teacher. KL terms are at ``T = 1`` by
default (``T^2`` then 1). Choices: ``lam = 0.35`` (published 0.3-0.4);
``ce_weight = 0`` as published; the teacher's lr is the scheduled lr times
``teacher_lr_scale = 0.3`` (the published BERT setting, 3e-5 vs 1e-4); the teacher starts
from ``teacher.weights`` if given, else from scratch (the image setting is unverified).
``dual: true`` enables the code's mirror-descent variant: ``L_T = CE + beta * (KL - eps)``
with ``beta <- max(0, beta + dual_lr * (KL - eps))`` after each step; under DDP every
rank keeps rank 0's ``beta`` (buffers are broadcast each forward). Requires
``train.grad_accum_steps = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdscale.methods.base import Distiller, register_method
from kdscale.methods.losses import cross_entropy, soft_kl


@register_method
class ProKT(Distiller):
    name = "prokt"
    description = "Progressive KD: the teacher trains toward what the student can reach; two steps per iteration."
    teacher_role = "trainable"
    teacher_outputs = ()
    trainable_networks = ("student", "teacher")
    optimizer_phases = ("teacher", "student")

    @dataclass
    class Params:
        lam: float = 0.35
        temperature: float = 1.0
        kl_weight: float = 1.0
        ce_weight: float = 0.0
        teacher_lr_scale: float = 0.3
        dual: bool = False
        dual_eps: float = 1.0
        dual_lr: float = 1e-3
        dual_beta0: float = 1.0

    def __init__(self, student, params, ctx):
        super().__init__(student, params, ctx)
        self.teacher = ctx.teacher.requires_grad_(True)
        self.register_buffer("dual_beta", torch.tensor(float(params.dual_beta0)))

    def phase_module(self, phase):
        return {"teacher": self.teacher, "student": self.student}[phase]

    def optimizer_groups(self, phase):
        scale = self.params.teacher_lr_scale if phase == "teacher" else 1.0
        return [{"params": list(self.phase_module(phase).parameters()), "lr_scale": scale}]

    @staticmethod
    def _eval_logits(network, images):
        was_training = network.training
        network.eval()
        with torch.no_grad():
            logits = network(images)
        network.train(was_training)
        return logits

    def forward_phase(self, phase, images, targets, teacher_output):
        p = self.params
        if phase == "teacher":
            student_logits = self._eval_logits(self.student, images)
            teacher_logits = self.teacher(images)
            ce = cross_entropy(teacher_logits, targets, self.label_smoothing)
            kl = soft_kl(student_logits, teacher_logits, p.temperature)
            if not p.dual:
                return teacher_logits, {"teacher_ce": (1 - p.lam) * ce, "teacher_kl": p.lam * kl}
            gap = kl - p.dual_eps
            terms = {"teacher_ce": ce, "teacher_dual": self.dual_beta * gap}
            with torch.no_grad():
                self.dual_beta.copy_((self.dual_beta + p.dual_lr * gap.detach()).clamp_min(0.0))
            return teacher_logits, terms
        if phase == "student":
            teacher_logits = self._eval_logits(self.teacher, images)
            logits = self.student(images)
            return logits, {"kd": p.kl_weight * soft_kl(teacher_logits, logits, p.temperature),
                            "ce": p.ce_weight * cross_entropy(logits, targets, self.label_smoothing)}
        raise ValueError(f"prokt has no phase {phase!r}")

    def evaluation_logits(self, images, teacher_output=None):
        return {"student": self.student(images), "teacher": self.teacher(images)}
