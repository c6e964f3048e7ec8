"""Streaming loaders over webdataset tar shards.

Training (after open_clip's recipe, made exactly resumable):
- each epoch the shard list is shuffled with a seed of (run seed, epoch), split by rank
  (node x local process) and then by DataLoader worker; the sample stream of a worker
  cycles over its shards, so every rank yields the same number of full batches
  (``partial=False``) whatever the shard sizes;
- a seeded shuffle buffer mixes samples; augmentation draws from a per-sample generator;
- a resumed run skips the batches already trained on *before decoding them*, and gets
  the same data and the same augmentations as a run that never stopped.
Validation is an exact pass: every sample is scored exactly once across all ranks and
workers, with shards spread over (rank, worker) pairs.

Loaders are never passed through ``accelerator.prepare`` (which would re-shard or
broadcast them).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kdscale.config.schema import DataSection
from kdscale.data.transforms import SampleDecoder
from kdscale.errors import KdscaleError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
Batch = tuple[torch.Tensor, torch.Tensor, list[str]]


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _samples_of(urls: list[str]) -> Iterator[dict]:
    from webdataset.tariterators import tarfile_samples

    yield from tarfile_samples([{"url": u} for u in urls])


def parse_sample(sample: dict, num_classes: int) -> tuple[str, bytes, int]:
    key, shard = sample.get("__key__", "?"), sample.get("__url__", "?")
    image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image is None:
        raise KdscaleError(f"shard {shard}: sample {key} has no image (.jpg/.png/.webp); fields: "
                           f"{', '.join(k for k in sample if not k.startswith('__'))}")
    if "cls" not in sample:
        raise KdscaleError(f"shard {shard}: sample {key} has no label (.cls)")
    try:
        label = int(sample["cls"].decode().strip() if isinstance(sample["cls"], bytes) else sample["cls"])
    except ValueError:
        raise KdscaleError(f"shard {shard}: sample {key} has a non-integer label {sample['cls']!r}") from None
    if not 0 <= label < num_classes:
        raise KdscaleError(f"shard {shard}: sample {key} has label {label}, outside data.num_classes={num_classes}")
    return key, image, label


class TrainStream(IterableDataset):
    """``batches_per_rank`` full batches for one rank and one epoch."""

    def __init__(self, shards: list[str], data: DataSection, *, seed: int, epoch: int, rank: int,
                 world_size: int, batches_per_rank: int, skip_batches: int = 0):
        self.shards, self.data = list(shards), data
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.batches_per_rank, self.skip_batches = batches_per_rank, skip_batches
        self.decoder = SampleDecoder(data, train=True)

    def _rng(self, *parts) -> random.Random:
        return random.Random("/".join(str(p) for p in (self.seed, self.epoch, self.rank) + parts))

    def _cycle(self, shards: list[str], worker: int) -> Iterator[dict]:
        for cycle in range(1 << 62):
            order = list(shards)
            self._rng(worker, "cycle", cycle).shuffle(order)
            seen = 0
            for sample in _samples_of(order):
                seen += 1
                yield sample
            if seen == 0:
                raise KdscaleError(f"training shards {', '.join(shards)} hold no samples")

    def _shuffled(self, samples: Iterator[dict], worker: int) -> Iterator[dict]:
        size = max(1, self.data.shuffle_buffer)
        rng, buffer = self._rng(worker, "buffer"), []
        for sample in samples:
            if len(buffer) < size:
                buffer.append(sample)
                continue
            j = rng.randrange(size)
            buffer[j], sample = sample, buffer[j]
            yield sample

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        # Batch g of this rank is made by stream g % workers (its (g // workers)-th batch).
        # DataLoader's round robin always starts at worker 0, so after skipping k batches
        # worker w plays stream (w + k) % workers, whose next batch is the k + w-th.
        stream_id = (worker + self.skip_batches) % workers
        order = list(self.shards)
        random.Random(f"{self.seed}/{self.epoch}/shards").shuffle(order)
        mine = order[self.rank::self.world_size][stream_id::workers]
        count = len(range(stream_id, self.batches_per_rank, workers))
        skip = len(range(stream_id, self.skip_batches, workers))
        stream = self._shuffled(self._cycle(mine, stream_id), stream_id)
        size = self.data.batch_size
        for b in range(count):
            raw = [next(stream) for _ in range(size)]
            if b < skip:
                continue
            keys, images, labels = [], [], []
            for i, sample in enumerate(raw):
                key, jpeg, label = parse_sample(sample, self.data.num_classes)
                images.append(self.decoder(jpeg, self._rng(stream_id, "sample", b * size + i)))
                keys.append(key)
                labels.append(label)
            yield torch.stack(images), torch.tensor(labels), keys


class ValStream(IterableDataset):
    """An exact pass: shard i goes to (rank, worker) pair i mod (ranks x workers)."""

    def __init__(self, shards: list[str], data: DataSection, *, rank: int, world_size: int):
        self.shards, self.data = sorted(shards), data
        self.rank, self.world_size = rank, world_size
        self.decoder = SampleDecoder(data, train=False)

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        slot, slots = self.rank * workers + worker, self.world_size * workers
        mine = self.shards[slot::slots]
        batch: list[tuple[str, torch.Tensor, int]] = []
        for sample in _samples_of(mine) if mine else ():
            key, jpeg, label = parse_sample(sample, self.data.num_classes)
            batch.append((key, self.decoder(jpeg, None), label))
            if len(batch) == self.data.batch_size:
                yield self._collate(batch)
                batch = []
        if batch:
            yield self._collate(batch)

    @staticmethod
    def _collate(batch) -> Batch:
        keys, images, labels = zip(*batch)
        return torch.stack(images), torch.tensor(labels), list(keys)


def check_shard_count(shards: list[str], key: str, world_size: int, workers: int) -> None:
    needed = world_size * max(1, workers)
    if len(shards) < needed:
        raise KdscaleError(
            f"{key}: {len(shards)} shards for {world_size} processes x {max(1, workers)} workers; every worker "
            f"needs its own shard. Write at least {needed} shards, or lower data.num_workers")


def make_loader(stream: IterableDataset, data: DataSection, pin_memory: bool) -> DataLoader:
    workers = data.num_workers
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers > 0 else None)
