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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdscale.methods.base import Distiller, register_method
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

    def forward_train(self, images, targets, teacher_output, phase="all"):
        p = self.params
        logits = self.student(images)
        teacher_logits = teacher_output.logits.detach()
        return logits, {
            "ce": p.ce_weight * cross_entropy(logits, targets, self.label_smoothing),
            "kd": p.kd_weight * soft_kl(teacher_logits, logits, p.temperature, p.t_squared, p.logit_standardization),
        }
