"""Weighted k-NN classification of summary features: the DINO evaluation protocol.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers" (DINO), sec. 4.1
and its code, facebookresearch/dino ``eval_knn.py`` ``knn_classifier``. Settings (defaults as in
DINO: ``--nb_knn 20`` is "usually working the best", ``--temperature 0.07``):

* Features are L2-normalised (``F.normalize``, eps 1e-12: a zero vector has similarity 0 to
  everything); cosine similarity is then the dot product, query x memory.
* The k memory rows of highest similarity vote; a neighbour with similarity s adds
  ``exp(s / T)`` to its label's score. k = 20, T = 0.07.
* Prediction: the class of highest score; ties go to the lowest class index (DINO's
  ``sort`` leaves tie order unspecified). Top-5 is the 5 highest (stable sort, lowest index
  first among equal scores, zero-vote classes included), over ``min(5, k)`` classes as in DINO.
  Equal similarities at the k-th place are broken by ``topk`` (unspecified, as in DINO).
* k larger than the memory: every memory row votes (k = N); DINO's ``topk`` would fail.
* Queries are scored in chunks of ``chunk`` rows, so the extra memory is chunk x N similarities
  plus chunk x num_classes scores (DINO splits the query set into 100 chunks, 500 images each
  on ImageNet val, and builds a (chunk x k) x num_classes one-hot; here votes are scatter-added).
  Chunking does not change the result.
* Arithmetic in float32, or float64 when the features are float64 (DINO: float32); bf16/fp16
  features are upcast. Hits are counted in int64.

Several ranks: :func:`knn_top1_distributed` gathers every rank's memory to every rank, so each
rank holds the whole memory, N x D floats (ImageNet's 1.28 M x 2048 would be 10 GB in fp32, and
about twice that while it is gathered and normalised): use a labelled train subset as the memory. Each rank scores its
own queries; hit counts are all-reduced, so the accuracy equals one process over the
concatenated data (memory in rank order). Memory or query labels outside [0, num_classes),
-1 (unknown) among them, are refused on every rank in one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from kdscale.errors import KdscaleError

if TYPE_CHECKING:
    from kdscale.parallel.context import DistContext

K, TEMPERATURE, CHUNK = 20, 0.07, 256


class KnnAccuracy(NamedTuple):
    top1: float  # percent
    top5: float  # percent, over min(5, k) classes as in DINO


def _compute_dtype(features: torch.Tensor) -> torch.dtype:
    return torch.float64 if features.dtype == torch.float64 else torch.float32


@torch.no_grad()
def knn_predict(memory_features: torch.Tensor, memory_labels: torch.Tensor, query_features: torch.Tensor,
                num_classes: int, k: int = K, temperature: float = TEMPERATURE, chunk: int = CHUNK) -> torch.Tensor:
    """Vote scores (M, num_classes): sum over each query's k nearest memory rows (cosine) of
    ``exp(s / T)`` into their labels' columns. Pure tensor code on the inputs' device."""
    if memory_features.shape[0] == 0:
        raise KdscaleError("k-NN evaluation: the memory (labelled train features) is empty")
    dtype = _compute_dtype(memory_features)
    memory = F.normalize(memory_features.to(dtype), dim=1)
    queries = F.normalize(query_features.to(dtype), dim=1)
    labels = memory_labels.to(memory.device, torch.long)
    k = min(k, memory.shape[0])
    scores = torch.zeros(queries.shape[0], num_classes, dtype=dtype, device=memory.device)
    for start in range(0, queries.shape[0], max(1, chunk)):
        part = queries[start:start + chunk]
        with torch.autocast(memory.device.type, enabled=False):  # in the features' dtype, also inside validation
            sims, idx = (part @ memory.T).topk(k, dim=1, largest=True, sorted=True)
        scores[start:start + part.shape[0]].scatter_add_(1, labels[idx], (sims / temperature).exp())
    return scores


def _hits(scores: torch.Tensor, query_labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 hits, top-5 hits) as int64 scalars; ties to the lowest class index."""
    targets = query_labels.to(scores.device, torch.long).view(-1, 1)
    order = scores.sort(dim=1, descending=True, stable=True).indices
    correct = order.eq(targets)
    return correct[:, :1].sum(), correct[:, :min(5, k, scores.shape[1])].sum()


def _check_labels(labels: torch.Tensor, num_classes: int) -> int:
    return int(((labels < 0) | (labels >= num_classes)).sum())


def _refuse(bad_memory: int, bad_queries: int, num_classes: int) -> None:
    if bad_memory or bad_queries:
        raise KdscaleError(f"k-NN evaluation needs labels in [0, {num_classes}): {bad_memory} memory and "
                           f"{bad_queries} query row(s) have others (-1 = unknown); use a labelled subset")


def knn_top1(memory_features: torch.Tensor, memory_labels: torch.Tensor, query_features: torch.Tensor,
             query_labels: torch.Tensor, num_classes: int, k: int = K, temperature: float = TEMPERATURE,
             chunk: int = CHUNK) -> KnnAccuracy:
    """Top-1 and top-5 accuracy (percent) of the weighted k-NN classifier, one process."""
    _refuse(_check_labels(memory_labels, num_classes), _check_labels(query_labels, num_classes), num_classes)
    scores = knn_predict(memory_features, memory_labels, query_features, num_classes, k, temperature, chunk)
    top1, top5 = _hits(scores, query_labels, min(k, memory_features.shape[0]))
    total = max(1, query_labels.shape[0])
    return KnnAccuracy(100.0 * int(top1) / total, 100.0 * int(top5) / total)


@torch.no_grad()
def knn_top1_distributed(ctx: "DistContext", memory_features: torch.Tensor, memory_labels: torch.Tensor,
                         query_features: torch.Tensor, query_labels: torch.Tensor, num_classes: int, k: int = K,
                         temperature: float = TEMPERATURE, chunk: int = CHUNK) -> KnnAccuracy:
    """:func:`knn_top1` over every rank's memory and queries (ranks may hold different counts);
    a collective: every rank calls it, and every rank gets the same result."""
    device = ctx.device
    bad = torch.tensor([_check_labels(memory_labels, num_classes), _check_labels(query_labels, num_classes)],
                       dtype=torch.long, device=device)
    _refuse(*(int(v) for v in ctx.all_reduce(bad)), num_classes)  # on every rank: none hangs
    dtype = _compute_dtype(memory_features)
    rows = ctx.gather(torch.tensor(memory_features.shape[0], dtype=torch.long, device=device)).tolist()
    most = max(rows)
    features = torch.zeros(most, memory_features.shape[1], dtype=dtype, device=device)
    features[:rows[ctx.rank]] = memory_features.to(device, dtype)
    labels = torch.zeros(most, dtype=torch.long, device=device)
    labels[:rows[ctx.rank]] = memory_labels.to(device, torch.long)
    all_features, all_labels = ctx.gather(features), ctx.gather(labels)  # (world, most, ...), padded
    memory = torch.cat([all_features[r, :n] for r, n in enumerate(rows)])
    memory_labels = torch.cat([all_labels[r, :n] for r, n in enumerate(rows)])
    del all_features, features
    scores = knn_predict(memory, memory_labels, query_features.to(device), num_classes, k, temperature, chunk)
    top1, top5 = _hits(scores, query_labels, min(k, memory.shape[0]))
    counts = ctx.all_reduce(torch.stack([top1, top5, torch.tensor(query_labels.shape[0], device=device)]))
    total = max(1, int(counts[2]))
    return KnnAccuracy(100.0 * int(counts[0]) / total, 100.0 * int(counts[1]) / total)
