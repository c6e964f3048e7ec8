"""``sp``: similarity-preserving KD, Tung & Mori, "Similarity-Preserving Knowledge
Distillation", ICCV 2019.

For each paired layer ``l``, the batch's Gram matrix of the flattened activations,
``G = F F^T`` (B x B), has each row L2-normalised; then::

    ce = ce_weight * CE(z_S, y)
    sp = beta * sum_l ||sg(G_T^l) - G_S^l||_F^2 / B^2

Verified: RepDistiller ``distiller_zoo/SP.py`` (``Similarity``, whose docstring and README
say it was verified by the paper's first author): ``F.normalize`` of each row, the squared
Frobenius norm over ``B^2``, summed over the layer pairs; ``helper/loops.py`` applies it to
``feat[-2]``, the output of the last residual stage before pooling (``layer3`` of the CIFAR
ResNets, ``block3`` of the WRNs, before the final BN/ReLU); ``-b 3000``, CE weight 1, no KD
(``-a 0``). Those are the defaults here.

Options: ``student_layers`` / ``teacher_layers`` (lists paired by position and summed, the
paper's sum over layer pairs); ``kd_weight`` (RepDistiller ``-a``) adds ``T^2 KL(p_T^T || p_S^T)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdscale.methods.base import register_method
from kdscale.methods.feature_distiller import FeatureDistiller
from kdscale.methods.layer_pairs import last_stage
from kdscale.methods.relations import similarity_preserving


@register_method
class SP(FeatureDistiller):
    name = "sp"
    paper = "Tung & Mori 2019, similarity-preserving KD"
    description = "Similarity-preserving KD: match row-normalised batch similarity matrices of a stage's activations."
    default_layer = staticmethod(last_stage)
    single_layer = False

    @dataclass
    class Params:
        beta: float = field(default=3000.0, metadata={"ge": 0})
        ce_weight: float = field(default=1.0, metadata={"ge": 0})
        kd_weight: float = field(default=0.0, metadata={"ge": 0})
        temperature: float = field(default=4.0, metadata={"gt": 0})
        student_layers: list[str] = field(default_factory=list)
        teacher_layers: list[str] = field(default_factory=list)

    def feature_terms(self, pairs):
        return {"sp": self.params.beta * sum(similarity_preserving(fs, ft) for fs, ft in pairs)}
