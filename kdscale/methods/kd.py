"""``kd``: Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".

``L = ce_weight * CE(z_S, y) + kd_weight * T^2 * KL(p_T^T || p_S^T)``

The frozen teacher's logits come from outside and carry no gradient: the teacher run
online on the same batch, or its stored top-k probabilities replayed from teacher-output
shards (``teacher.source: shards``, written by ``kdscale.teach``; the method gets their log
as logits).

Defaults are the RepDistiller CIFAR-100 protocol (T=4, ce_weight=0.1, kd_weight=0.9). The
``T^2`` factor is on by default as in the paper; ``t_squared: false`` turns it off for
comparisons with code that omits it.

``logit_standardization: true`` (Sun et al., CVPR 2024, "Logit Standardization in Knowledge
Distillation") z-scores both logits per sample before the temperature, which is then a base
temperature; ``T^2`` stays (verified: sunshangquan/logit-standardization-KD
``mdistiller/distillers/KD.py``; their CIFAR-100 runs: T=2, CE 1, KD 9). See
:func:`~kdscale.methods.losses.standardize_logits`.

Several frozen teachers (``ensemble``; :mod:`kdscale.methods.ensemble`), their weights
normalised to sum to 1, so equal weights keep ``kd_weight`` at its single-teacher scale:

- ``probs`` (default; Hinton et al. 2015's ensemble target): ``p_T^T = sum_i w_i p_i^T``;
- ``logits``: ``p_T^T = softmax(sum_i w_i z_i / T)``, the mean of the logits;
- ``per_teacher``: one term per teacher, ``kd_<id> = kd_weight * w_i * T^2 KL(p_i^T || p_S^T)``;
  their sum is the weighted mean of the single-teacher KD terms.

With one teacher every form is today's ``kd`` term, bit for bit. Logit standardization
z-scores the mean of the raw logits (``logits``) or each teacher (``per_teacher``);
``probs`` with several teachers and standardization is refused when the method is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kdscale.methods.base import Distiller, register_method
from kdscale.methods.ensemble import ensemble_target_logits, refuse_standardized_probs
from kdscale.methods.losses import cross_entropy, soft_kl


@register_method
class KD(Distiller):
    name = "kd"
    paper = "Hinton et al. 2015, knowledge distillation"
    description = "Hinton KD: CE plus temperature-scaled KL to a frozen teacher's logits."
    teacher_role = "frozen"

    @dataclass
    class Params:
        temperature: float = field(default=4.0, metadata={"gt": 0})
        ce_weight: float = field(default=0.1, metadata={"ge": 0})
        kd_weight: float = field(default=0.9, metadata={"ge": 0})
        t_squared: bool = True
        logit_standardization: bool = False
        ensemble: Literal["probs", "logits", "per_teacher"] = "probs"

    def __init__(self, student, params, context):
        refuse_standardized_probs(self.name, context, params.ensemble, params.logit_standardization,
                                  fix="method.ensemble=logits or method.ensemble=per_teacher")
        super().__init__(student, params, context)

    def forward_train(self, images, targets, teacher_output, phase="all"):
        p = self.params
        logits = self.student(images)
        terms = {"ce": p.ce_weight * cross_entropy(logits, targets, self.label_smoothing)}
        members = teacher_output.member_items()
        if p.ensemble == "per_teacher" and len(members) > 1:
            for tid, teacher_logits, weight in members:
                terms[f"kd_{tid}"] = p.kd_weight * weight * soft_kl(
                    teacher_logits.detach(), logits, p.temperature, p.t_squared, p.logit_standardization)
            return logits, terms
        form = "logits" if p.ensemble == "per_teacher" else p.ensemble
        teacher_logits = ensemble_target_logits(teacher_output, p.temperature, form).detach()
        terms["kd"] = p.kd_weight * soft_kl(teacher_logits, logits, p.temperature, p.t_squared, p.logit_standardization)
        return logits, terms
