"""``dml``: deep mutual learning, Zhang, Xiang, Hospedales & Lu, CVPR 2018.

K peers train from scratch together; for each peer k
``L_k = ce_weight * CE(z_k, y) + kl_weight/(K-1) * sum_{j != k} T^2 KL(sg(p_j^T) || p_k^T)``.

Choices:
- All peers are updated in **one** optimizer step on the sum of their losses, with the
  stop-gradients above, the common implementation. The paper's Algorithm 1 alternates the
  peer updates (each peer recomputes its peers' predictions after the previous update);
  that sequential form is not offered.
- ``peer_kl: mean`` (default, the paper's Eq. 10: ``1/(K-1)`` times the sum over the other
  peers) or ``sum`` (the authors' code, which adds the K-1 KL terms without dividing); the
  two agree at K = 2, the default.
- ``T = 1`` by default as in the paper; the ``T^2`` factor is then 1.
- The student is peer 0; ``peers`` lists the other architectures (default: one peer of
  the student's architecture). Every peer is evaluated as ``val/peer<k>_top1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from kdscale.methods.base import Distiller, register_method
from kdscale.methods.losses import cross_entropy, soft_kl


@register_method
class DML(Distiller):
    name = "dml"
    paper = "Zhang et al. 2018, deep mutual learning"
    description = "Deep mutual learning: peers trained from scratch, each matching the others' predictions."

    @dataclass
    class Params:
        peers: list[str] = field(default_factory=list)
        temperature: float = field(default=1.0, metadata={"gt": 0})
        ce_weight: float = field(default=1.0, metadata={"ge": 0})
        kl_weight: float = field(default=1.0, metadata={"ge": 0})
        peer_kl: Literal["mean", "sum"] = "mean"

    def __init__(self, student, params, context):
        super().__init__(student, params, context)
        names = params.peers or [context.student_name]
        self.peers = nn.ModuleList(context.build_model(name) for name in names)

    def _networks(self):
        return [("", self.student)] + [(f"peer{k}_", peer) for k, peer in enumerate(self.peers, start=1)]

    def forward_train(self, images, targets, teacher_output, phase="all"):
        p = self.params
        networks = self._networks()
        logits = [net(images) for _, net in networks]
        others = len(logits) - 1
        losses = {}
        for k, (prefix, _) in enumerate(networks):
            losses[f"{prefix}ce"] = p.ce_weight * cross_entropy(logits[k], targets, self.label_smoothing)
            mutual = sum(soft_kl(logits[j].detach(), logits[k], p.temperature) for j in range(len(logits)) if j != k)
            losses[f"{prefix}kl"] = p.kl_weight / (others if p.peer_kl == "mean" else 1) * mutual
        return logits[0], losses

    def evaluation_logits(self, images, teacher_output=None):
        return {(prefix.rstrip("_") or "student"): net(images) for prefix, net in self._networks()}
