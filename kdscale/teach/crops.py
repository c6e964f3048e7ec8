"""The teacher-output writer's loader side: image shards decoded and cropped in DataLoader
workers, handed to the rank in chunks of whole images.

A rank's shards are split over its workers (``worker::workers``); a worker reads its
shards one after the other and yields, per shard, chunks of ``images_per_chunk``
consecutive samples counted from the shard's start (so a chunk's samples never depend on
the rank, the worker or where an earlier run stopped), then an end marker. Every sample
gets ``crops`` random-resized views seeded by (seed, key) (:func:`crop_boxes`), as uint8;
the rank normalises them on its device. A sample that cannot be used (no image, no label
under ``data.labels=required``, undecodable) gets no crops, and an empty record keeps the
keys aligned.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset

from kdscale.data.loader import DECODE_ERRORS, BadSample, _worker, parse_sample
from kdscale.data.teacher_outputs import crop_boxes, replay_crop
from kdscale.errors import KdscaleError


class CropChunk(NamedTuple):
    shard: int
    """Index of the shard in the rank's work list."""
    start: int
    """Position in the shard of the chunk's first sample."""
    keys: list[str]
    counts: list[int]
    """Crops per sample: ``crops``, or 0 for a sample that cannot be used."""
    crops: torch.Tensor
    """float32 (sum(counts), 4): crop boxes as fractions of the image."""
    flips: torch.Tensor
    """uint8 (sum(counts),)."""
    views: torch.Tensor
    """uint8 (sum(counts), 3, size, size)."""
    end: bool
    """The end marker of the shard: no samples; ``start`` is the shard's sample count."""
    previous_key: str | None
    """Key of the sample before ``start`` (None at 0): checks a resumed partial's alignment."""


class CropStream(IterableDataset):
    """``work``: (image shard, samples already written) per shard of this rank."""

    def __init__(self, work: list[tuple[str, int]], *, num_classes: int, image_size: int, crops: int, seed: int,
                 images_per_chunk: int, labels_required: bool = True):
        """``labels_required``: False under ``data.labels=none`` (a sample without ``.cls`` is used)."""
        self.work, self.num_classes, self.image_size = list(work), num_classes, image_size
        self.labels_required = labels_required
        self.crops, self.seed, self.images_per_chunk = crops, seed, max(1, images_per_chunk)

    def __iter__(self) -> Iterator[CropChunk]:
        worker, workers = _worker()
        for index in range(worker, len(self.work), workers):
            yield from self.shard_chunks(index)

    def shard_chunks(self, index: int) -> Iterator[CropChunk]:
        from kdscale.data.tar_reader import iter_samples

        shard, start = self.work[index]
        samples = iter_samples(shard)
        previous = None
        for skipped, sample in enumerate(itertools.islice(samples, start)):  # written already: not decoded
            previous = sample["__key__"]
        if start and (previous is None or skipped + 1 < start):
            raise KdscaleError(f"the partial teacher outputs of {shard} hold {start} records, more than the image "
                               f"shard's samples; delete the .partial file and rerun kdscale.teach")
        position = start
        while True:
            batch = list(itertools.islice(samples, self.images_per_chunk))
            if not batch:
                break
            yield self._chunk(index, position, batch, previous)
            position += len(batch)
            previous = batch[-1]["__key__"]
        empty = torch.zeros(0, dtype=torch.uint8)
        yield CropChunk(index, position, [], [], torch.zeros(0, 4), empty, empty, True, previous)

    def _views(self, sample: dict):
        from PIL import Image

        key, jpeg, _label = parse_sample(sample, self.num_classes, self.labels_required)
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        boxes, flips = crop_boxes(key, image.width, image.height, self.crops, self.seed)
        views = [replay_crop(image, box, bool(flip), self.image_size) for box, flip in zip(boxes, flips)]
        return boxes, flips, views

    def _chunk(self, index: int, start: int, batch: list[dict], previous: str | None) -> CropChunk:
        keys, counts, boxes, flips, views = [], [], [], [], []
        for sample in batch:
            keys.append(sample["__key__"])
            try:
                b, f, v = self._views(sample)
            except (BadSample, *DECODE_ERRORS):
                counts.append(0)
                continue
            counts.append(len(v))
            boxes.append(b)
            flips.append(f)
            views.extend(v)
        size = self.image_size
        return CropChunk(index, start, keys, counts,
                         torch.from_numpy(np.concatenate(boxes)) if boxes else torch.zeros(0, 4),
                         torch.from_numpy(np.concatenate(flips)) if flips else torch.zeros(0, dtype=torch.uint8),
                         torch.stack(views) if views else torch.zeros(0, 3, size, size, dtype=torch.uint8),
                         False, previous)
