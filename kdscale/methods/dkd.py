"""``dkd``: Decoupled Knowledge Distillation, Zhao, Cui, Song, Qiu & Liang, CVPR 2022
(arXiv:2203.08679; code: github megvii-research/mdistiller, ``mdistiller/distillers/DKD.py``).

With ``p = softmax(z / T)`` over the K classes and the label ``y`` of each sample:

- ``b = [p_y, 1 - p_y]``: the binary target / non-target probabilities;
- ``q = softmax over the classes c != y of z_c / T``: the distribution among the non-targets.

Terms (each KL batch-averaged; verified: ``DKD.py`` ``dkd_loss``, ``forward_train``):

- ``ce = ce_weight * CE(z_S, y)``, 1.0;
- ``tckd = w(e) * alpha * T^2 * KL(b_T || b_S)``, alpha = 1.0;
- ``nckd = w(e) * beta * T^2 * KL(q_T || q_S)``, beta = 8.0, T = 4;
- ``w(e) = min((e + 1) / warmup, 1)`` for the 0-based epoch e, warmup = 20: the code's
  ``min(epoch / WARMUP, 1)`` with mdistiller's 1-based epoch, changed once per epoch.
  ``warmup: 0`` turns it off.

The defaults are the code's (``mdistiller/engine/cfg.py``, CIFAR-100); beta is set per pair in
the authors' configs (``configs/cifar100/dkd/*.yaml``: 8 for resnet32x4 -> resnet8x4, 6 for the
WRN pairs, 2 for resnet56 -> resnet20; ImageNet: T 1, beta 0.5 (R34 -> R18) or 2 (R50 ->
MobileNet-V1), warmup 1). The paper's DKD is ``alpha TCKD + beta NCKD`` as in the code.

Choices:
- Numerics (inferred; the same values to float precision): the code forms ``b`` from summed
  softmax entries and takes their log, and drops the target from ``q`` by subtracting 1000
  from its scaled logit. kdscale takes ``log(1 - p_y)`` as a log-sum-exp over the non-target
  log-probabilities and leaves the target out of ``q`` exactly, so neither term can hit
  ``log(0)`` when a probability underflows.
- ``logit_standardization: true`` z-scores both logits per sample before ``/ T`` (Sun et al.
  CVPR 2024; verified: sunshangquan/logit-standardization-KD ``mdistiller/distillers/DKD.py``,
  the same ``normalize`` as their KD). Only the z-score is switched: their ``tools/train.py``
  with ``--logit-stand --kd-weight 9`` also sets ``ALPHA = 9 * ALPHA`` and then ``BETA = 9 * ALPHA``
  (81 with the default alpha), and its ``--base-temp`` sets ``KD.TEMPERATURE``, which DKD does
  not read; set alpha, beta and temperature explicitly.
- Several frozen teachers (``ensemble``; :mod:`kdscale.methods.ensemble`), weights normalised
  to sum to 1 (equal weights keep alpha and beta at their single-teacher scale): ``probs``
  (default) distils ``p = sum_i w_i softmax(z_i / T)``, so ``b_T = [p_y, 1 - p_y]`` and
  ``q_T = p_c / (1 - p_y)`` are the ensemble's own, exactly; ``logits`` distils
  ``softmax(sum_i w_i z_i / T)``. Logit standardization z-scores the mean of the raw logits
  (``logits``); with ``probs`` and several teachers it is refused when the method is built.
  One teacher: both forms are today's terms, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from kdscale.methods.base import Distiller, register_method
from kdscale.methods.ensemble import ensemble_target_logits, refuse_standardized_probs
from kdscale.methods.losses import cross_entropy, standardize_logits


def decoupled_kd(teacher_logits: torch.Tensor, student_logits: torch.Tensor, targets: torch.Tensor,
                 temperature: float, standardize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T^2 KL(b_T || b_S), T^2 KL(q_T || q_S))``, each batch-averaged and unweighted (see the
    module docstring). Gradients reach both sides unless the caller detaches one."""
    if standardize:
        teacher_logits, student_logits = standardize_logits(teacher_logits), standardize_logits(student_logits)
    t = float(temperature)
    target = F.one_hot(targets, student_logits.shape[1]).bool()
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)

    def binary(log_p):  # [log p_y, log(1 - p_y)]
        return torch.cat([log_p.gather(1, targets[:, None]),
                          log_p.masked_fill(target, float("-inf")).logsumexp(dim=1, keepdim=True)], dim=1)

    tckd = F.kl_div(binary(log_p_s), binary(log_p_t), reduction="batchmean", log_target=True)
    # Non-target distributions: the target's entry is exactly 0 in q_T (so it adds nothing) and
    # its -inf log in q_S is replaced by 0 before the KL, so no inf or NaN reaches the gradient.
    log_q_s = F.log_softmax((student_logits.float() / t).masked_fill(target, float("-inf")), dim=1)
    q_t = F.softmax((teacher_logits.float() / t).masked_fill(target, float("-inf")), dim=1)
    nckd = F.kl_div(log_q_s.masked_fill(target, 0.0), q_t, reduction="batchmean")
    return tckd * (t * t), nckd * (t * t)


@register_method
class DKD(Distiller):
    name = "dkd"
    paper = "Zhao et al. 2022, decoupled KD"
    description = "Decoupled KD: target-class (TCKD) and non-target-class (NCKD) KL, weighted apart."
    teacher_role = "frozen"

    @dataclass
    class Params:
        ce_weight: float = field(default=1.0, metadata={"ge": 0})
        alpha: float = field(default=1.0, metadata={"ge": 0})
        beta: float = field(default=8.0, metadata={"ge": 0})
        temperature: float = field(default=4.0, metadata={"gt": 0})
        warmup: float = field(default=20.0, metadata={"ge": 0})
        logit_standardization: bool = False
        ensemble: Literal["probs", "logits"] = "probs"

    def __init__(self, student, params, context):
        refuse_standardized_probs(self.name, context, params.ensemble, params.logit_standardization)
        super().__init__(student, params, context)

    def warmup_factor(self) -> float:
        """``min((epoch + 1) / warmup, 1)``: mdistiller's weight for its 1-based epoch."""
        return min((self.epoch + 1) / self.params.warmup, 1.0) if self.params.warmup > 0 else 1.0

    def forward_train(self, images, targets, teacher_output, phase="all"):
        p = self.params
        logits = self.student(images)
        teacher_logits = ensemble_target_logits(teacher_output, p.temperature, p.ensemble).detach()
        tckd, nckd = decoupled_kd(teacher_logits, logits, targets, p.temperature, p.logit_standardization)
        w = self.warmup_factor()
        return logits, {
            "ce": p.ce_weight * cross_entropy(logits, targets, self.label_smoothing),
            "tckd": w * p.alpha * tckd,
            "nckd": w * p.beta * nckd,
        }
