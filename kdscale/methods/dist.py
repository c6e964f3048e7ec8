"""``dist``: DIST, Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger
Teacher", NeurIPS 2022 (arXiv:2205.10536; code: github hunto/DIST_KD, whose classification
loss is ``lib/models/losses/dist_kd.py`` of its submodule hunto/image_classification_sota).

With ``P_X = softmax(z_X / tau)`` (a B x K matrix) and the Pearson correlation
``rho(u, v) = <u - mean(u), v - mean(v)> / (||u - mean(u)|| ||v - mean(v)|| + 1e-8)``:

- ``ce = ce_weight * CE(z_S, y)``, 1;
- ``inter = kd_weight * beta * tau^2 * (1 - mean_i rho(P_S[i, :], P_T[i, :]))``: each
  sample's class probabilities (the inter-class relation);
- ``intra = kd_weight * gamma * tau^2 * (1 - mean_c rho(P_S[:, c], P_T[:, c]))``: each class's
  probabilities across the batch (the intra-class relation).

Verified: ``dist_kd.py`` (``cosine_similarity`` with eps 1e-8, ``pearson_correlation``,
``inter_class_relation``, ``intra_class_relation``, ``DIST(beta, gamma, tau)`` with ``tau**2``
on both relations; read in the copy with ``tau`` that hunto/LocalMamba ships under
``classification/lib/models/losses/``; the oldest stored version has no ``tau``, i.e. tau = 1),
``kd_loss.py`` (``ori_loss * ori_loss_weight + kd_loss * kd_loss_weight``; ``kd: dist`` is
``DIST(1, 1, tau=1)``, ``dist_t4`` tau 4). Published settings (``configs/strategies/distill/``):
ImageNet ``resnet_dist.yaml`` (kd 2, tau 1) and CIFAR-100 ``dist_cifar.yaml`` (kd 2, tau 4),
both CE 1, beta = gamma = 1. The paper's full text was not read; the code is followed.

Choices:
- ``intra_batch: local`` (default, the code): the intra-class relation is taken over each
  rank's own micro-batch, as the authors' DDP code does (8 GPUs x 32 images on ImageNet), so it
  depends on the per-rank batch size: 2 ranks x 4 images is not 1 rank x 8. ``global`` gathers
  both probability matrices over the data-parallel ranks first (gradients flow back to each
  rank's rows), so the term is the single-process one on the global batch whatever the world
  size (inferred: an option for runs that must not depend on the GPU count).
- No logit standardization switch: neither the DIST code nor the logit-standardization code
  applies the z-score to DIST.
- Several frozen teachers (``ensemble``; :mod:`kdscale.methods.ensemble`), weights normalised
  to sum to 1 (equal weights keep kd_weight at its single-teacher scale): ``probs`` (default)
  correlates with the ensemble's probability matrix ``P_T = sum_i w_i softmax(z_i / tau)``
  (exactly); ``logits`` with ``softmax(sum_i w_i z_i / tau)``. One teacher: both forms are
  today's terms, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from kdscale.methods.base import Distiller, register_method
from kdscale.methods.ensemble import ensemble_target_logits
from kdscale.methods.losses import cross_entropy
from kdscale.parallel.collectives import gather_rows


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``; the authors'
    ``cosine_similarity`` of the centred rows, with ``eps`` added to the product of norms."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_relations(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float,
                   intra_batch: str = "local") -> tuple[torch.Tensor, torch.Tensor]:
    """``(tau^2 (1 - mean_i rho(P_S[i], P_T[i])), tau^2 (1 - mean_c rho(P_S[:, c], P_T[:, c])))``."""
    t = float(tau)
    p_s = F.softmax(student_logits.float() / t, dim=1)
    p_t = F.softmax(teacher_logits.float() / t, dim=1)
    inter = 1 - pearson_rows(p_s, p_t).mean()
    if intra_batch == "global":
        p_s, p_t = gather_rows(p_s), gather_rows(p_t)
    intra = 1 - pearson_rows(p_s.t(), p_t.t()).mean()
    return inter * (t * t), intra * (t * t)


@register_method
class DIST(Distiller):
    name = "dist"
    paper = "Huang et al. 2022, DIST (KD from a stronger teacher)"
    description = "DIST: Pearson-correlation relations of class probabilities, per sample and per class."
    teacher_role = "frozen"

    @dataclass
    class Params:
        ce_weight: float = field(default=1.0, metadata={"ge": 0})
        kd_weight: float = field(default=2.0, metadata={"ge": 0})
        beta: float = field(default=1.0, metadata={"ge": 0})
        gamma: float = field(default=1.0, metadata={"ge": 0})
        tau: float = field(default=1.0, metadata={"gt": 0})
        intra_batch: Literal["local", "global"] = "local"
        ensemble: Literal["probs", "logits"] = "probs"

    def forward_train(self, images, targets, teacher_output, phase="all"):
        p = self.params
        logits = self.student(images)
        teacher_logits = ensemble_target_logits(teacher_output, p.tau, p.ensemble).detach()
        inter, intra = dist_relations(teacher_logits, logits, p.tau, p.intra_batch)
        return logits, {
            "ce": p.ce_weight * cross_entropy(logits, targets, self.label_smoothing),
            "inter": p.kd_weight * p.beta * inter,
            "intra": p.kd_weight * p.gamma * intra,
        }
