"""``pkt``: probabilistic knowledge transfer, Passalis & Tefas, "Learning Deep
Representations with Probabilistic Knowledge Transfer", ECCV 2018 (code: github
passalis/probabilistic_kt).

On the penultimate features (the input of the last linear layer; see
:mod:`kdscale.methods.layer_pairs`) of the batch, each row of the cosine kernel
``K(i,j) = (cos(e_i, e_j) + 1) / 2`` is normalised to a conditional distribution
``p(j|i) = K(i,j) / sum_k K(i,k)``::

    ce  = ce_weight * CE(z_S, y)
    pkt = beta * mean_{i,j} sg(p_T(j|i)) log((sg(p_T(j|i)) + eps) / (p_S(j|i) + eps)),  eps = 1e-7

Verified: passalis/probabilistic_kt ``nn/pkt.py`` (``cosine_similarity_loss``: vectors divided
by ``norm + eps``, NaNs set to 0, the mean over all ``B^2`` entries, self-pairs included),
copied unchanged into RepDistiller ``distiller_zoo/PKT.py``; RepDistiller's weight and
features: ``-b 30000`` on ``feat[-1]`` (the pooled features), CE weight 1, no KD (``-a 0``).

Options: ``student_layer`` / ``teacher_layer`` (another layer, flattened); ``kd_weight``
(RepDistiller ``-a``) adds ``T^2 KL(p_T^T || p_S^T)``. The paper's text was not re-read
for this port; the authors' code is the form implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdscale.methods.base import register_method
from kdscale.methods.feature_distiller import FeatureDistiller
from kdscale.methods.layer_pairs import penultimate_layer
from kdscale.methods.relations import pkt


@register_method
class PKT(FeatureDistiller):
    name = "pkt"
    paper = "Passalis & Tefas 2018, probabilistic knowledge transfer"
    description = "Probabilistic KT: match the cosine-kernel neighbour distributions of penultimate features (KL)."
    default_layer = staticmethod(penultimate_layer)

    @dataclass
    class Params:
        beta: float = field(default=30000.0, metadata={"ge": 0})
        ce_weight: float = field(default=1.0, metadata={"ge": 0})
        kd_weight: float = field(default=0.0, metadata={"ge": 0})
        temperature: float = field(default=4.0, metadata={"gt": 0})
        eps: float = field(default=1e-7, metadata={"gt": 0})
        student_layer: str = ""
        teacher_layer: str = ""

    def feature_terms(self, pairs):
        (fs, ft), = pairs
        return {"pkt": self.params.beta * pkt(fs, ft, self.params.eps)}
