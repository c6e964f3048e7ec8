"""``deit``: Touvron et al. 2021, "Training data-efficient image transformers & distillation
through attention" (DeiT, distillation token).

The student is a distilled ViT (timm ``VisionTransformerDistilled``, e.g.
``timm:deit_tiny_distilled_patch16_224``): besides the class token it carries a
distillation token with a head of its own. In training it gives two logits, ``z_cls`` (the
class head) and ``z_dist`` (the distillation head); the labels supervise the first, the
frozen teacher the second:

``L = (1 - alpha) * CE(z_cls, y) + alpha * L_dist(z_dist, z_T)``

- ``distillation: hard`` (default; the paper's DeiT⚗ setting): ``L_dist = CE(z_dist,
  argmax z_T)``, the teacher's top-1 as a hard label, without label smoothing;
- ``distillation: soft``: ``L_dist = T^2 * sum KL(p_T^T || p_dist^T) / N`` with ``T = tau``.
  With ``soft_normalization: numel`` (default) ``N`` is the number of logits, batch x
  classes, as in the authors' code (which keeps the legacy ``reduction='mean'`` of
  PyTorch's ``kl_div``); this is the usual batch-mean KL divided by the number of classes.
  ``soft_normalization: batch`` divides by the batch size instead (the batch-mean KL that
  :func:`~kdscale.methods.losses.soft_kl` computes), which the authors mention having
  tried as well.

Verified: facebookresearch/deit ``losses.py`` (``DistillationLoss``: the two branches, the
``numel`` division, ``base * (1 - alpha) + distillation * alpha``) and ``main.py``
(``--distillation-alpha 0.5``, ``--distillation-tau 1.0``); timm ``models/deit.py``
(``VisionTransformerDistilled``: the tuple in training after ``set_distilled_training``,
the mean of the two heads otherwise).

Terms (``train/loss_<term>``): ``ce`` = ``(1 - alpha) * CE(z_cls, y)`` (``y`` may be soft:
Mixup/CutMix targets and ``train.label_smoothing`` go through
:func:`~kdscale.methods.losses.cross_entropy`, the authors' base criterion) and ``dist`` =
``alpha * L_dist``. With soft targets the hard branch still uses the teacher's argmax.

The teacher's logits come from outside (online, or replayed from teacher-output shards)
and are detached. Evaluation scores the two-head mean as ``student`` (what the model
predicts at inference) and each head alone as ``class_head`` and ``dist_head``.

Several frozen teachers (``ensemble``; :mod:`kdscale.methods.ensemble`), weights normalised
to sum to 1: ``probs`` (default) takes the ensemble target ``sum_i w_i softmax(z_i / tau)``,
``logits`` ``softmax(sum_i w_i z_i / tau)``; soft distillation distils it, hard distillation
takes its argmax (with ``probs``, the class of the highest mean probability at ``tau``, 1 by
default). One teacher: both forms are today's terms, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from kdscale.errors import KdscaleError
from kdscale.methods.base import Distiller, register_method
from kdscale.methods.ensemble import ensemble_target_logits
from kdscale.methods.losses import cross_entropy


def is_distilled_vit(model: torch.nn.Module) -> bool:
    """Whether ``model`` has a distillation head that timm can switch on (``head_dist`` and
    ``set_distilled_training``)."""
    return hasattr(model, "head_dist") and callable(getattr(model, "set_distilled_training", None))


def deit_soft_distillation(dist_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float,
                           normalization: str = "numel") -> torch.Tensor:
    """``tau^2 * sum_{i,k} KL(softmax(z_T / tau) || softmax(z_dist / tau))`` divided by the
    number of logits (``numel``, the authors' code) or by the batch size (``batch``)."""
    t = float(tau)
    log_p_student = F.log_softmax(dist_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    total = F.kl_div(log_p_student, log_p_teacher, reduction="sum", log_target=True)
    denominator = dist_logits.numel() if normalization == "numel" else dist_logits.shape[0]
    return total * (t * t) / denominator


def deit_hard_distillation(dist_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``CE(z_dist, argmax z_T)``: the teacher's decision as the label, no smoothing."""
    return cross_entropy(dist_logits, teacher_logits.argmax(dim=1))


@register_method
class DeiT(Distiller):
    name = "deit"
    paper = "Touvron et al. 2021, DeiT distillation token"
    description = ("DeiT: CE on a distilled ViT's class head, the frozen teacher's (hard or soft) "
                   "decision on its distillation head.")
    teacher_role = "frozen"
    probe_student = "timm:deit_tiny_distilled_patch16_224"
    """The smallest student ``kdscale methods`` can build this method on."""

    @dataclass
    class Params:
        distillation: Literal["hard", "soft"] = "hard"
        alpha: float = field(default=0.5, metadata={"ge": 0, "le": 1})
        tau: float = field(default=1.0, metadata={"gt": 0})
        soft_normalization: Literal["numel", "batch"] = "numel"
        ensemble: Literal["probs", "logits"] = "probs"

    def __init__(self, student, params, context):
        if not is_distilled_vit(student):
            raise KdscaleError(
                f"method 'deit' needs a student with a distillation token, but student.name="
                f"{context.student_name or type(student).__name__} has none (no head_dist/set_distilled_training); "
                f"use a timm distilled ViT such as student.name=timm:deit_small_distilled_patch16_224")
        super().__init__(student, params, context)

    def _training_heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class-head logits, distillation-head logits) from timm's distilled-training mode,
        switched on for this call only, so that every other caller of the student (export,
        probes, evaluation) sees a plain classifier."""
        self.student.set_distilled_training(True)
        try:
            out = self.student(images)
        finally:
            self.student.set_distilled_training(False)
        if isinstance(out, torch.Tensor):  # eval mode: timm returns the mean; take the heads apart
            return self._heads(images)
        return out

    def _heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both heads read from the class and distillation tokens, as timm's ``forward_head``."""
        tokens = self.student.forward_features(images)
        drop = self.student.head_drop
        return self.student.head(drop(tokens[:, 0])), self.student.head_dist(drop(tokens[:, 1]))

    def forward_train(self, images, targets, teacher_output, phase="all"):
        p = self.params
        class_logits, dist_logits = self._training_heads(images)
        teacher_logits = ensemble_target_logits(teacher_output, p.tau, p.ensemble).detach()
        if p.distillation == "soft":
            distill = deit_soft_distillation(dist_logits, teacher_logits, p.tau, p.soft_normalization)
        else:
            distill = deit_hard_distillation(dist_logits, teacher_logits)
        logits = (class_logits + dist_logits) / 2
        return logits, {
            "ce": (1.0 - p.alpha) * cross_entropy(class_logits, targets, self.label_smoothing),
            "dist": p.alpha * distill,
        }

    def evaluation_logits(self, images, teacher_output=None):
        class_logits, dist_logits = self._heads(images)
        return {"student": (class_logits + dist_logits) / 2, "class_head": class_logits, "dist_head": dist_logits}
