"""Relation losses between the embeddings of one batch (RKD, PKT, SP).

Each loss takes the student's features ``fs`` and the teacher's ``ft`` of the same batch,
flattens them per sample to ``(B, D)`` and computes in float32 with autocast off. The teacher side never
carries a gradient (it is detached here, as the authors compute it under ``no_grad``); the
student side keeps every path, including through its own normalisations. Relations are
taken over the batch this rank sees: under data parallelism each rank relates its own
micro-batch (``data.batch_size`` is per rank, so batch 64 is RepDistiller's setting on any
number of ranks).

The features are the penultimate ones, tapped as :mod:`kdscale.methods.layer_pairs` says.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kdscale.methods.layer_pairs import penultimate_layer

__all__ = ["flat", "pairwise_distances", "penultimate_layer", "pkt", "rkd_angle", "rkd_distance",
           "similarity_preserving"]  # penultimate_layer: re-exported for the importers of its former home


def flat(feature: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` -> ``(B, D)`` in float32 (RepDistiller's ``f.view(B, -1)``)."""
    return feature.float().reshape(feature.shape[0], -1)


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
