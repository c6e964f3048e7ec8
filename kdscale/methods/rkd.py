"""``rkd``: relational KD, Park, Kim, Lu & Cho, "Relational Knowledge Distillation",
CVPR 2019 (code: github lenscloth/RKD).

On the penultimate features ``e`` (the input of the last linear layer; see
:mod:`kdscale.methods.layer_pairs` for how they are tapped) of the batch::

    ce       = ce_weight * CE(z_S, y)
    distance = distance_weight * mean_{i,j} huber(d_S(i,j) / mu_S, sg(d_T(i,j) / mu_T))
    angle    = angle_weight * mean_{i,j,k} huber(cos_S(i,j,k), sg(cos_T(i,j,k)))

with ``d`` the Euclidean distance, ``mu`` the mean of the non-zero distances of the batch,
``cos(i,j,k)`` the cosine of the angle at ``e_i`` between ``e_j`` and ``e_k``, and huber the
smooth-L1 loss with threshold 1, averaged over all ``B^2`` pairs and ``B^3`` triplets.

Verified: the loss form in lenscloth/RKD ``metric/loss.py`` (``RkdDistance``, ``RKdAngle``)
and in RepDistiller ``distiller_zoo/RKD.py`` (identical); the teacher side under
``no_grad``, the student's normalisation ``mu_S`` not detached. The weights 25 and 50 and the
features are RepDistiller's (``RKDLoss(w_d=25, w_a=50)``, ``-b 1``, ``feat[-1]``: the pooled
features), with CE weight 1 and no KD (``-a 0``): the default here.

Options:
- ``normalize: true`` L2-normalises both embeddings first, as the authors' own CIFAR script
  does (verified: lenscloth/RKD ``run_distill_classification.py``, which also adds KD:
  ``kd_weight`` 16 at T=4 without ``T^2``; kdscale's KD term keeps ``T^2``, so use
  ``kd_weight = 1`` for the same strength).
- ``student_layer`` / ``teacher_layer``: another layer (flattened) instead of the penultimate.
- ``kd_weight`` (RepDistiller ``-a``) adds ``T^2 KL(p_T^T || p_S^T)``.
The paper's text (sums over pairs vs the code's means) was not re-read for this port; the
code's means go with the published weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdscale.methods.base import register_method
from kdscale.methods.feature_distiller import FeatureDistiller
from kdscale.methods.layer_pairs import penultimate_layer
from kdscale.methods.relations import rkd_angle, rkd_distance


@register_method
class RKD(FeatureDistiller):
    name = "rkd"
    paper = "Park et al. 2019, relational KD"
    description = "Relational KD: match distance and angle relations among a batch's penultimate features."
    default_layer = staticmethod(penultimate_layer)

    @dataclass
    class Params:
        distance_weight: float = field(default=25.0, metadata={"ge": 0})
        angle_weight: float = field(default=50.0, metadata={"ge": 0})
        ce_weight: float = field(default=1.0, metadata={"ge": 0})
        kd_weight: float = field(default=0.0, metadata={"ge": 0})
        temperature: float = field(default=4.0, metadata={"gt": 0})
        normalize: bool = False
        student_layer: str = ""
        teacher_layer: str = ""

    def feature_terms(self, pairs):
        p = self.params
        (fs, ft), = pairs
        return {"distance": p.distance_weight * rkd_distance(fs, ft, p.normalize),
                "angle": p.angle_weight * rkd_angle(fs, ft, p.normalize)}
