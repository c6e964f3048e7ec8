"""``crd``: contrastive representation distillation, Tian, Krishnan & Isola, "Contrastive
Representation Distillation", ICLR 2020 (code: github HobbitLong/RepDistiller).

Two trained heads embed the penultimate features (the input of the last linear layer; see
:mod:`kdscale.methods.layer_pairs`): ``v_S = l2(W_S f_S + b_S)``, ``v_T = l2(W_T sg(f_T) + b_T)``
(``l2``: divide by the L2 norm; 128 dimensions). Two memory banks hold one embedding per
training sample, ``M_S`` (the student's) and ``M_T`` (the teacher's). For a sample with
dataset index ``i`` and ``K`` negatives ``j_1..j_K``, with ``P(v, m) = exp(<v, m> / tau) / Z``
and ``c = K / N + eps`` (``N`` the training-set size, ``eps = 1e-7``)::

    ce  = ce_weight * CE(z_S, y)
    crd = beta * (L(v_S, M_T) + L(v_T, M_S))
    L(v, M) = -1/B sum_i [ log(P(v_i, M_i) / (P(v_i, M_i) + c))
                           + sum_k log((K / N) / (P(v_i, M_{j_k}) + c)) ]

then ``M_S[i] <- l2(m M_S[i] + (1 - m) v_S)`` (and ``M_T`` alike) after the scores are taken.
``Z`` is set once, from the first batch: ``mean(exp(<v, m> / tau)) * N`` over its
``B (K + 1)`` scores, one ``Z`` per direction.

Verified (RepDistiller ``crd/criterion.py``: ``CRDLoss``, ``ContrastLoss``, ``Embed``,
``Normalize``; ``crd/memory.py``: ``ContrastMemory``; ``dataset/cifar100.py``:
``CIFAR100InstanceSample``; ``train_student.py``; ``helper/loops.py``):
- both heads are trained (``trainable_list`` holds ``embed_s`` and ``embed_t``); the bank rows
  are detached; the teacher's features come from ``feat_t[-1]`` under ``no_grad``;
- ``feat_dim 128``, ``nce_k 16384``, ``nce_t 0.07``, ``nce_m 0.5``, ``-b 0.8``, CE weight 1, no
  KD (``-a 0``; CRD+KD is ``-a 1``: ``kd_weight: 1``, T = 4);
- banks initialised uniform in ``+-1/sqrt(D/3)``; the update uses the embeddings of this
  step and normalises by the plain L2 norm;
- ``--mode exact``: the positive is the sample's own row, the negatives are drawn from the
  samples of the *other* classes (``negatives: other_class``, the default); ``negatives:
  uniform`` draws over every sample, as ``ContrastMemory`` does when given no indices;
  ``positive: relax`` (``--mode relax``) takes as positive the row of a sample of the same
  class, drawn uniformly (itself included); the bank still updates the sample's own row.

Choices of this port, each stated:
- Negatives are drawn **with replacement** (RepDistiller's dataset draws each sample's
  16384 without replacement from ~49500 on CIFAR-100). Every negative is uniform over the
  same set either way, so the expected loss and gradient are equal; with replacement about
  1 in 7 of a CIFAR sample's negatives repeat one already drawn (K^2 / 2 / pool).
- The draw is a hash of ``(experiment.seed, step's draw count, dataset index, column)``, not
  NumPy's global stream in loader workers: deterministic under a seed, the same on any
  number of ranks, and restored on resume (the draw count is checkpointed).
- Banks are sharded across ranks by row (:mod:`kdscale.methods.contrast_memory`), and every
  rank scores the whole gathered batch against the rows it holds; the loss is then the
  one-process loss over the global batch (2 ranks x b equal 1 rank x 2b, tested).
- ``Z`` is taken over the first *global* batch (RepDistiller: its one GPU's batch).
- Dataset indices come from the shards' ``index.json`` order (:mod:`kdscale.data.sample_index`).
  With Mixup/CutMix the index is the unmixed sample's; an image the loader could not decode
  is replaced by another of its batch, index included.
The embedding heads are children (trained, sharded under ZeRO, checkpointed, not exported);
the banks are gathered whole into each checkpoint (``2 N D`` floats), so a run resumes on any
number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from kdscale.errors import KdscaleError
from kdscale.log import log
from kdscale.methods.base import register_method
from kdscale.methods.contrast_memory import ContrastMemory, ContrastSampler
from kdscale.methods.feature_distiller import FeatureDistiller
from kdscale.methods.layer_pairs import penultimate_layer
from kdscale.methods.relations import flat


class Embedding(nn.Module):
    """RepDistiller's ``Embed``: flatten, linear, divide by the L2 norm."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.linear(flat(features))
        return x / x.pow(2).sum(dim=1, keepdim=True).sqrt()


def _width(shape, key: str) -> int:
    width = 1
    for size in shape:
        width *= int(size)
    if width < 1:
        raise KdscaleError(f"{key}: the layer gives an empty feature of shape {tuple(shape)}")
    return width


@register_method
class CRD(FeatureDistiller):
    name = "crd"
    paper = "Tian et al. 2020, contrastive representation distillation"
    description = "Contrastive representation distillation: NCE against memory banks of student/teacher embeddings."
    default_layer = staticmethod(penultimate_layer)
    needs_sample_indices = True

    @dataclass
    class Params:
        beta: float = field(default=0.8, metadata={"ge": 0})
        ce_weight: float = field(default=1.0, metadata={"ge": 0})
        kd_weight: float = field(default=0.0, metadata={"ge": 0})
        temperature: float = field(default=4.0, metadata={"gt": 0})
        feat_dim: int = field(default=128, metadata={"ge": 1})
        nce_k: int = field(default=16384, metadata={"ge": 1})
        nce_t: float = field(default=0.07, metadata={"gt": 0})
        nce_m: float = field(default=0.5, metadata={"ge": 0, "le": 1})
        negatives: Literal["other_class", "uniform"] = "other_class"
        positive: Literal["exact", "relax"] = "exact"
        student_layer: str = ""
        teacher_layer: str = ""

    def __init__(self, student, params, context):
        if context.train_labels is None:
            raise KdscaleError("method 'crd' keeps a memory bank row per training sample: it needs the training "
                               "set's labels by dataset index (kdscale.train reads them from the shards)")
        super().__init__(student, params, context)
        s_layer, t_layer = self.features.student_layers[0], self.features.teacher_layers[0]
        self.embed_student = Embedding(_width(self.features.student_shapes[s_layer], "method.student_layer"),
                                       params.feat_dim)
        self.embed_teacher = Embedding(_width(self.features.teacher_shapes[t_layer], "method.teacher_layer"),
                                       params.feat_dim)
        labels = context.train_labels
        self.sampler = ContrastSampler(labels, params.negatives, context.seed)
        if params.negatives == "other_class" and int(self.sampler.class_count.max()) == len(labels):
            raise KdscaleError("method.negatives=other_class: every training sample has the same label, so there "
                               "is no other class to draw negatives from; use method.negatives=uniform")
        self.memory = ContrastMemory(len(labels), params.feat_dim, context.seed)
        log.info(f"crd: memory banks of {len(labels)} samples x {params.feat_dim}: "
                 f"{self.memory.bytes_per_rank() / 2**20:.1f} MiB on each of {self.memory.world} rank(s)")

    def feature_terms(self, pairs, sample_indices=None):
        (fs, ft), = pairs
        with torch.autocast(fs.device.type, enabled=False):
            p = self.params
            contrast = self.memory.contrast_loss(self.embed_student(fs), self.embed_teacher(ft), sample_indices,
                                                 self.sampler, p.nce_k, p.nce_t, p.nce_m, p.positive)
        return {"crd": self.params.beta * contrast}

    def state_bytes_per_sample(self) -> int:
        return 2 * self.params.feat_dim * 4  # a float32 row in each bank

    def gathered_state(self) -> dict:
        return self.memory.gathered()

    def restore_gathered_state(self, state: dict) -> None:
        self.memory.restore(state)
