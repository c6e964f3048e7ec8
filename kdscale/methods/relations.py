"""Relation losses between the embeddings of one batch (RKD, PKT, SP), and the layer
plumbing and common terms of the feature methods (FitNet, RKD, PKT, SP): :class:`FeaturePairs`
and their base class :class:`FeatureDistiller`.

Each loss takes the student's features ``fs`` and the teacher's ``ft`` of the same batch,
flattens them per sample to ``(B, D)`` and computes in float32 with autocast off. The teacher side never
carries a gradient (it is detached here, as the authors compute it under ``no_grad``); the
student side keeps every path, including through its own normalisations. Relations are
taken over the batch this rank sees: under data parallelism each rank relates its own
micro-batch (``data.batch_size`` is per rank, so batch 64 is RepDistiller's setting on any
number of ranks).

Penultimate features are the input of a network's last ``nn.Linear``. kdscale taps the
**output of the module that runs just before it** (a forward hook; ``avgpool`` in the CIFAR
and torchvision ResNets and WRNs, ``global_pool`` in timm's), flattened: the frozen
teacher's features reach a method only through forward hooks on module outputs
(``TeacherNeeds.features``), and the student is tapped the same way. The module is found by
a dry forward in which its flattened output must equal, exactly, what a forward pre-hook on
the last ``nn.Linear`` receives; otherwise the method asks for the layer by name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kdscale.errors import KdscaleError
from kdscale.methods.base import Distiller, TeacherNeeds
from kdscale.methods.losses import cross_entropy, soft_kl
from kdscale.models.features import FeatureTaps, feature_shapes, residual_stages


def flat(feature: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` -> ``(B, D)`` in float32 (RepDistiller's ``f.view(B, -1)``)."""
    return feature.float().reshape(feature.shape[0], -1)


# -- the losses ------------------------------------------------------------------------
def _without_autocast(loss):
    """Run a relation loss with autocast off: its matrix products (Gram matrices, angles)
    would otherwise run in bf16 under mixed precision, several percent off."""

    @functools.wraps(loss)
    def wrapper(fs, ft, *args, **kwargs):
        with torch.autocast(fs.device.type, enabled=False):
            return loss(fs, ft, *args, **kwargs)

    return wrapper


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows of ``e``, 0 on the diagonal: the authors' ``pdist``
    (squared distance clamped at ``eps`` before the square root), with the squared distance
    summed from the differences rather than their ``|a|^2 + |b|^2 - 2ab``, which cancels in
    float32 when the rows are close (untrained pooled features are)."""
    dist = (e.unsqueeze(1) - e.unsqueeze(0)).pow(2).sum(dim=2).clamp(min=eps).sqrt()
    return dist * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


@_without_autocast
def rkd_distance(fs: torch.Tensor, ft: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """RKD distance term (Park et al. 2019): ``mean_{i,j} huber(d_S(i,j) / mu_S, d_T(i,j) / mu_T)``
    over all ``B^2`` pairs (the diagonal included, where both are 0), ``mu`` the mean of the
    non-zero distances, Huber = smooth-L1 with threshold 1. ``normalize``: L2-normalise the
    embeddings first (the authors' ``run_distill_classification.py``)."""
    s, t = flat(fs), flat(ft).detach()
    if normalize:
        s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
    td = pairwise_distances(t)
    td = td / td[td > 0].mean()
    sd = pairwise_distances(s)
    sd = sd / sd[sd > 0].mean()
    return F.smooth_l1_loss(sd, td)


def _angles(e: torch.Tensor) -> torch.Tensor:
    """``cos`` of the angle at ``e_i`` between ``e_j`` and ``e_k``, for every ``(i, j, k)`` (0 where
    ``j`` or ``k`` is ``i``: a zero vector normalises to 0)."""
    unit = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [i, j] = unit(e_j - e_i)
    return torch.bmm(unit, unit.transpose(1, 2)).flatten()


@_without_autocast
def rkd_angle(fs: torch.Tensor, ft: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """RKD angle term: ``mean_{i,j,k} huber(cos_S(i,j,k), cos_T(i,j,k))`` over all ``B^3`` triplets."""
    s, t = flat(fs), flat(ft).detach()
    if normalize:
        s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
    return F.smooth_l1_loss(_angles(s), _angles(t))


def _cosine_probabilities(e: torch.Tensor, eps: float) -> torch.Tensor:
    norm = torch.sqrt(torch.sum(e ** 2, dim=1, keepdim=True))
    e = e / (norm + eps)
    e = torch.where(torch.isnan(e), torch.zeros_like(e), e)
    similarity = (e @ e.t() + 1.0) / 2.0  # cosine kernel scaled to [0, 1]
    return similarity / similarity.sum(dim=1, keepdim=True)  # row i: p(j | i)


@_without_autocast
def pkt(fs: torch.Tensor, ft: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """PKT (Passalis & Tefas 2018): rows of the cosine kernel ``(cos + 1) / 2`` normalised to
    conditional probabilities, then ``mean_{i,j} p_T(j|i) log((p_T(j|i) + eps) / (p_S(j|i) + eps))``
    over all ``B^2`` entries (the self-pairs included), as the authors' code computes it.

    Computed in float64 (B x B numbers): the summands are first-order in the difference of
    two nearly equal distributions and cancel to a second-order total, of which float32
    loses about 1e-4 (relative) on untrained features."""
    p_t = _cosine_probabilities(flat(ft).detach().double(), eps)
    p_s = _cosine_probabilities(flat(fs).double(), eps)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps))).float()


@_without_autocast
def similarity_preserving(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """SP (Tung & Mori 2019): ``||G_T - G_S||_F^2 / B^2`` with ``G = row_normalize(F F^T)``
    (each row of the batch Gram matrix L2-normalised)."""
    s, t = flat(fs), flat(ft).detach()
    g_s, g_t = F.normalize(s @ s.t()), F.normalize(t @ t.t())
    return (g_t - g_s).pow(2).sum() / (len(s) * len(s))


# -- which layers ----------------------------------------------------------------------
def penultimate_layer(model: nn.Module, image_size: int, where: str) -> str:
    """Path of the module whose output, flattened, is the input of ``model``'s last
    ``nn.Linear`` (see the module docstring)."""
    modules = dict(model.named_modules())
    linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise KdscaleError(f"{where}: {type(model).__name__} has no nn.Linear, so no penultimate features; name "
                           f"the layer to use")
    head = linears[-1]
    ancestors = {head.rsplit(".", i)[0] for i in range(1, head.count(".") + 1)} | {""}
    last: list = [None]
    found: list = []

    def record(name):
        def hook(_module, _inputs, output):
            last[0] = (name, output)
        return hook

    def check(_module, inputs):
        if last[0] is not None and torch.is_tensor(last[0][1]) and torch.is_tensor(inputs[0]):
            name, out = last[0]
            if out.shape[0] == inputs[0].shape[0] and torch.equal(out.reshape(len(out), -1),
                                                                  inputs[0].reshape(len(out), -1)):
                found.append(name)

    handles = [m.register_forward_hook(record(n)) for n, m in modules.items() if n not in ancestors and n != head]
    handles.append(modules[head].register_forward_pre_hook(check))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if not found:
        raise KdscaleError(f"{where}: cannot tell which module of {type(model).__name__} feeds its last linear layer "
                           f"{head!r} (a function runs in between); name the layer to use")
    return found[-1]


def second_stage(model: nn.Module, image_size: int, where: str) -> str:
    return residual_stages(model, where)[1]


def last_stage(model: nn.Module, image_size: int, where: str) -> str:
    return residual_stages(model, where)[-1]


DefaultLayer = Callable[[nn.Module, int, str], str]


class FeaturePairs:
    """Paired student and teacher layers of a feature method: the student tapped with
    forward hooks, the teacher's paths for :meth:`Distiller.teacher_needs`, each layer's
    shape from a dry forward (a wrong name fails when the method is built). Empty lists
    take ``default`` on each network; the keys in errors are ``method.student_<key>`` and
    ``method.teacher_<key>``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layers: list[str],
                 teacher_layers: list[str], image_size: int, default: DefaultLayer, key: str = "layers"):
        s_key, t_key = f"method.student_{key}", f"method.teacher_{key}"
        self.student_layers = list(student_layers) or [default(student, image_size, s_key)]
        self.teacher_layers = list(teacher_layers) or [default(teacher, image_size, t_key)]
        if len(self.student_layers) != len(self.teacher_layers):
            raise KdscaleError(f"{s_key} {self.student_layers} and {t_key} {self.teacher_layers} pair up by position "
                               f"and must have the same length")
        self.student_shapes = feature_shapes(student, self.student_layers, image_size, where=f"{s_key} (student)")
        self.teacher_shapes = feature_shapes(teacher, self.teacher_layers, image_size, where=f"{t_key} (teacher)",
                                             frozen=True)
        self.taps = FeatureTaps(student, self.student_layers, where="student")

    def pairs(self, teacher_features: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(student, detached teacher)`` features of the student's last forward, paired."""
        features = self.taps.pop()
        return [(features[s], teacher_features[t].detach()) for s, t in zip(self.student_layers, self.teacher_layers)]


class FeatureDistiller(Distiller):
    """Base of the feature methods that read a frozen teacher's layers (FitNet, RKD, PKT, SP)::

        ce = ce_weight * CE(z_S, y)
        <the method's terms on the paired layers>
        kd = kd_weight * T^2 KL(p_T^T || p_S^T)    (only when kd_weight > 0: RepDistiller's -a)

    A subclass states its ``Params`` (``ce_weight``, ``kd_weight``, ``temperature``, and either
    ``student_layer`` / ``teacher_layer`` strings or, with ``single_layer = False``,
    ``student_layers`` / ``teacher_layers`` lists; empty takes ``default_layer``), its
    ``default_layer`` (a :data:`DefaultLayer`, wrapped in ``staticmethod``) and
    :meth:`feature_terms`. ``self.features`` holds the pairs; the teacher is asked for their
    features, and for its logits when ``kd_weight > 0``."""

    teacher_role = "frozen"
    default_layer: ClassVar[DefaultLayer]
    single_layer: ClassVar[bool] = True

    def __init__(self, student, params, context):
        super().__init__(student, params, context)
        if self.single_layer:
            layers = ([params.student_layer] if params.student_layer else [],
                      [params.teacher_layer] if params.teacher_layer else [])
        else:
            layers = (params.student_layers, params.teacher_layers)
        self.features = FeaturePairs(student, context.frozen_teacher, *layers, context.image_size,
                                     self.default_layer, key="layer" if self.single_layer else "layers")

    def teacher_needs(self):
        return TeacherNeeds(logits=self.params.kd_weight > 0, features=tuple(self.features.teacher_layers))

    def feature_terms(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The method's weighted terms on the ``(student, detached teacher)`` feature pairs."""
        raise NotImplementedError

    def logit_terms_on(self) -> bool:
        """Whether CE and KD train now (they stay in the graph at weight 0 when not)."""
        return True

    def forward_train(self, images, targets, teacher_output, phase="all", **sample_indices):
        """``sample_indices`` (only for a subclass with ``needs_sample_indices``: CRD) reach
        :meth:`feature_terms` as its keyword."""
        p = self.params
        logits = self.student(images)
        on = self.logit_terms_on()
        terms = {"ce": (p.ce_weight if on else 0.0) * cross_entropy(logits, targets, self.label_smoothing),
                 **self.feature_terms(self.features.pairs(teacher_output.features), **sample_indices)}
        if p.kd_weight > 0:
            terms["kd"] = (p.kd_weight if on else 0.0) * soft_kl(teacher_output.logits.detach(), logits,
                                                                   p.temperature)
        return logits, terms
