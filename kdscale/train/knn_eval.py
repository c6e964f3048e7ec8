"""k-NN top-1 of summary features in validation, and the adapted features' cosine to each
teacher: what a run without training labels is judged by (issue 27).

The protocol is DINO's (Caron et al. 2021; :mod:`kdscale.train.knn`: L2-normalised features,
cosine similarity, k = 20, votes weighted by ``exp(s / 0.07)``):
- the **memory** is the summary features of a labelled subset of training images, seen as
  validation sees them (the centre crop, no augmentation): ``data.knn_memory_shards``
  (default: the training shards when they are labelled), the first ``data.knn_memory_samples``
  of them (each rank reads its own shards, as validation does, up to its share
  ``ceil(samples / ranks)``; the memory is then gathered whole);
- the **queries** are the validation images, scored in the same pass as the top-1 of the
  networks' logits (:func:`kdscale.train.evaluate.evaluate`): each online teacher runs once.

Each network of :meth:`~kdscale.methods.base.Distiller.evaluation_features` (``student``)
and each online teacher that gives a summary target is scored: ``val/<name>_knn_top1`` and
``_knn_top5``. The method's cosines (the ``features`` method: its adapted student features
against each teacher's) are averaged over the validation images: ``val/cosine_<id>``.
``train.knn_eval``: ``auto`` scores methods that distil features (``distils_features``),
``always`` any method, ``never`` none.
"""

from __future__ import annotations

import math
import warnings

import torch

from kdscale.config.schema import ExperimentConfig
from kdscale.data.loader import ValStream, make_loader
from kdscale.data.shards import expand_shards, recorded_unlabelled
from kdscale.train.knn import knn_top1_distributed


def knn_memory_shards(cfg: ExperimentConfig, method_cls) -> list[str] | None:
    """The shards of the k-NN memory, or None when ``train.knn_eval`` leaves k-NN off (or no
    labelled shards are named: a warning says which key to set)."""
    mode = cfg.train.knn_eval
    if mode == "never" or (mode == "auto" and not method_cls.distils_features):
        return None
    if cfg.data.knn_memory_shards:
        return expand_shards(cfg.data.knn_memory_shards, "data.knn_memory_shards")
    train = expand_shards(cfg.data.train_shards, "data.train_shards")
    if cfg.data.labels == "none" or recorded_unlabelled(train):
        warnings.warn("k-NN validation is off: the training shards are unlabelled; set data.knn_memory_shards to "
                      "labelled shards (e.g. a labelled subset of the training images) to score val/student_knn_top1",
                      stacklevel=2)
        return None
    return train


def _summaries(distiller, images, teacher_output) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(summary features by name, per-image cosines by teacher) of one batch, float32."""
    summaries, cosines = distiller.evaluation_features(images, teacher_output)
    found = {name: value.float() for name, value in summaries.items()}
    if teacher_output is not None:
        for tid, targets in teacher_output.member_features.items():
            if "summary" in targets:
                found[tid] = targets["summary"].float()
    return found, {tid: value.float() for tid, value in cosines.items()}


class KnnScores:
    """Collects one validation pass's query features (:meth:`observe`), then scores them
    against the memory (:meth:`metrics`). Every rank makes the same calls."""

    def __init__(self, memory_shards: list[str], cfg: ExperimentConfig, ctx, pin_memory: bool = False,
                 channels_last: bool = False):
        self.memory_shards, self.cfg, self.ctx, self.pin_memory = memory_shards, cfg, ctx, pin_memory
        self.channels_last = channels_last
        self.queries: dict[str, list[torch.Tensor]] = {}
        self.labels: list[torch.Tensor] = []
        self.cosine_sums: dict[str, torch.Tensor] = {}
        self.widths: dict[str, int] = {}

    def names(self, distiller, dummy, teacher_probe) -> tuple[list[str], list[str]]:
        """The scored names and cosine ids, the same on every rank (from a dummy batch)."""
        summaries, cosines = _summaries(distiller, dummy, teacher_probe)
        self.queries = {name: [] for name in summaries}
        self.widths = {name: value.shape[1] for name, value in summaries.items()}
        self.cosine_sums = {tid: torch.zeros((), dtype=torch.float64, device=self.ctx.device) for tid in cosines}
        return list(summaries), list(cosines)

    def observe(self, distiller, images, targets, teacher_output, real: bool = True) -> None:
        """Runs the networks on a validation batch (every rank, in lockstep where needed) and
        keeps what a real batch gave."""
        summaries, cosines = _summaries(distiller, images, teacher_output)
        if not real:
            return
        for name in self.queries:
            self.queries[name].append(summaries[name])
        for tid in self.cosine_sums:
            self.cosine_sums[tid] += cosines[tid].double().sum()
        self.labels.append(targets)

    def _memory(self, distiller, teacher, batches) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        features = {name: [] for name in self.queries}
        labels = []
        size = self.cfg.data.image_size
        for batch, real in batches:
            images = batch.images.to(self.ctx.device, non_blocking=True)
            if images.shape[0] == 0:  # a batch that only reports skipped samples: still a call in lockstep
                images, real = torch.zeros(1, 3, size, size, device=self.ctx.device), False
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            teacher_output = teacher(images) if teacher is not None else None
            summaries, _ = _summaries(distiller, images, teacher_output)
            if not real:
                continue
            for name in features:
                features[name].append(summaries[name])
            labels.append(batch.targets.to(self.ctx.device))
        return ({name: torch.cat(parts) if parts else torch.zeros(0, self.widths[name], device=self.ctx.device)
                 for name, parts in features.items()},
                torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=self.ctx.device))

    def memory_batches(self):
        """This rank's share of the memory images, as validation batches (real batches only)."""
        stream = ValStream(self.memory_shards, self.cfg.data, rank=self.ctx.rank, world_size=self.ctx.world_size)
        share = math.ceil(self.cfg.data.knn_memory_samples / self.ctx.world_size)
        taken = 0
        for batch in make_loader(stream, self.cfg.data, pin_memory=self.pin_memory):
            if taken >= share:
                return
            if batch.images.shape[0] > share - taken:
                batch = batch._replace(images=batch.images[:share - taken], targets=batch.targets[:share - taken],
                                       keys=batch.keys[:share - taken])
            taken += batch.images.shape[0]
            yield batch

    def metrics(self, distiller, teacher, memory_batches, total: float) -> dict[str, float]:
        """Scores the queries against the memory read from ``memory_batches`` ((batch, real)
        pairs, in lockstep where the networks need it); ``total``: validation samples, all ranks."""
        memory, memory_labels = self._memory(distiller, teacher, memory_batches)
        device, num_classes = self.ctx.device, self.cfg.data.num_classes
        labels = torch.cat(self.labels).to(device) if self.labels else torch.zeros(0, dtype=torch.long, device=device)
        metrics = {}
        for name, parts in self.queries.items():
            queries = torch.cat(parts) if parts else torch.zeros(0, self.widths[name], device=device)
            accuracy = knn_top1_distributed(self.ctx, memory[name], memory_labels, queries, labels, num_classes)
            metrics[f"val/{name}_knn_top1"], metrics[f"val/{name}_knn_top5"] = accuracy.top1, accuracy.top5
        for tid, value in self.cosine_sums.items():
            metrics[f"val/cosine_{tid}"] = float(self.ctx.all_reduce(value.clone(), "sum")) / max(1.0, total)
        return metrics
