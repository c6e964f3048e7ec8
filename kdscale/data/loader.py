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

import functools
import multiprocessing
import os
import random
import signal
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kdscale.config.schema import DataSection
from kdscale.data.bad_samples import DECODE_ERRORS, BadSample, BadSampleLog
from kdscale.data.device_decode import DeferredDecoder, EncodedBatch, stack_views
from kdscale.data.transforms import SampleDecoder
from kdscale.errors import KdscaleError
from kdscale.lifecycle.helpers import start_multiprocessing_helpers
from kdscale.lifecycle.stop import STOP_SIGNALS
from kdscale.log import setup_logging

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class Batch(NamedTuple):
    images: torch.Tensor | EncodedBatch
    """Normalised views (B, 3, S, S), or encoded JPEGs to decode on the device (data.decode=gpu)."""
    targets: torch.Tensor
    keys: list[str]
    bad_samples: int
    """Bad samples this worker found (for the first time this epoch) while making this batch."""
    teacher_probs: torch.Tensor | None = None
    """Soft labels replayed from teacher-output shards, (B, replayed teachers, classes)."""
    indices: torch.Tensor | None = None
    """Each sample's dataset index (:mod:`kdscale.data.sample_index`), when the stream numbers them."""
    teacher_features: dict[int, dict[str, torch.Tensor]] | None = None
    """Feature targets replayed from teacher-output shards, by replayed teacher and kind:
    float16 ``(B, *shape)`` (summary ``(B, D)``, spatial ``(B, C, H, W)``)."""


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _samples_of(urls: list[str], bad: BadSampleLog | None = None) -> Iterator[dict]:
    """Samples of the shards in order. With ``bad``, an unreadable or truncated shard is
    logged and its readable samples are kept; without, errors propagate."""
    from kdscale.data.tar_reader import iter_samples

    for url in urls:
        if bad is None:
            yield from iter_samples(url)
            continue
        try:
            yield from iter_samples(url)
        except (OSError, ValueError) as err:
            bad.skip(f"the rest of shard {url}: {type(err).__name__}: {err}")


def parse_sample(sample: dict, num_classes: int, labels_required: bool = True) -> tuple[str, bytes, int]:
    """(key, image bytes, label); raises :class:`BadSample` naming the key and shard. Without
    ``labels_required`` (``data.labels=none``) a sample without ``.cls`` has label -1."""
    key, shard = sample.get("__key__", "?"), sample.get("__url__", "?")
    image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image is None:
        raise BadSample(f"sample {key} in {shard}: no image (.jpg/.png/.webp); fields: "
                        f"{', '.join(k for k in sample if not k.startswith('__'))}")
    if "cls" not in sample:
        if not labels_required:
            return key, image, -1
        raise BadSample(f"sample {key} in {shard}: no label (.cls)")
    try:
        label = int(sample["cls"].decode().strip() if isinstance(sample["cls"], bytes) else sample["cls"])
    except ValueError:
        raise BadSample(f"sample {key} in {shard}: non-integer label {sample['cls']!r}") from None
    if not 0 <= label < num_classes:
        raise BadSample(f"sample {key} in {shard}: label {label} outside data.num_classes={num_classes}")
    return key, image, label


def valid_samples(samples: Iterator[dict], num_classes: int, bad: BadSampleLog,
                  labels_required: bool = True) -> Iterator[tuple]:
    """(key, image bytes, label, shard, teacher record or None, dataset index or -1) of the
    usable samples; the others are logged."""
    for sample in samples:
        try:
            yield (*parse_sample(sample, num_classes, labels_required), sample.get("__url__", "?"),
                   sample.get("__teacher__"),
                   sample.get("__index__", -1))
        except BadSample as err:
            bad.skip(str(err))


def decode_or_skip(decoder, item: tuple, rng, bad: BadSampleLog, num_classes: int = 0):
    """The decoded image, or (image, soft labels, features) when the sample carries teacher
    outputs (:func:`kdscale.data.teacher_outputs.replay_sample`); None for an undecodable
    image (logged)."""
    from kdscale.data.teacher_outputs import replay_sample

    key, jpeg, _label, shard, record, _index = item
    try:
        return decoder(jpeg, rng) if record is None else replay_sample(decoder, jpeg, record, rng, num_classes)
    except DECODE_ERRORS as err:
        bad.skip(f"sample {key} in {shard}: cannot decode the image ({type(err).__name__}: {err})")
        return None


class TrainStream(IterableDataset):
    """``batches_per_rank`` full batches per epoch for one rank, from epoch ``epoch`` (after
    ``skip_batches`` of it) through epoch ``epochs - 1``: one loader serves the whole run, so
    its workers start once."""

    def __init__(self, shards: list[str], data: DataSection, *, seed: int, epoch: int, rank: int,
                 world_size: int, batches_per_rank: int, skip_batches: int = 0, epochs: int | None = None,
                 teacher_outputs: list[str] | None = None, sample_offsets: dict[str, int] | None = None):
        """``teacher_outputs``: the teacher-output directories of the replayed teachers, in order."""
        self.shards, self.data, self.teacher_outputs = list(shards), data, teacher_outputs or None
        self.sample_offsets = sample_offsets
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.first_epoch, self.end_epoch = epoch, epoch + 1 if epochs is None else epochs
        self.batches_per_rank, self.skip_batches = batches_per_rank, skip_batches
        self.decoder = DeferredDecoder(data) if data.decode == "gpu" else SampleDecoder(data, train=True)

    def _rng(self, epoch: int, *parts) -> random.Random:
        return random.Random("/".join(str(p) for p in (self.seed, epoch, self.rank) + parts))

    def _cycle(self, shards: list[str], epoch: int, stream_id: int, bad: BadSampleLog) -> Iterator[tuple]:
        for cycle in range(1 << 62):
            order = list(shards)
            self._rng(epoch, stream_id, "cycle", cycle).shuffle(order)
            seen = 0
            for item in valid_samples(self._raw(order, bad), self.data.num_classes, bad,
                                      labels_required=self.data.labels == "required"):
                seen += 1
                yield item
            if seen == 0:
                raise KdscaleError(f"training shards {', '.join(shards)} hold no usable samples")

    def _raw(self, shards: list[str], bad: BadSampleLog) -> Iterator[dict]:
        from kdscale.data.sample_index import numbered
        from kdscale.data.tar_reader import iter_samples
        from kdscale.data.teacher_outputs import paired_samples

        for shard in shards:
            try:
                samples = iter_samples(shard) if self.teacher_outputs is None else \
                    paired_samples(shard, self.teacher_outputs)
                if self.sample_offsets is not None:
                    samples = numbered(samples, self.sample_offsets[os.path.basename(shard)])
                yield from samples
            except (OSError, ValueError) as err:
                bad.skip(f"the rest of shard {shard}: {type(err).__name__}: {err}")

    def _shuffled(self, samples: Iterator[tuple], rng: random.Random) -> Iterator[tuple]:
        size = max(1, self.data.shuffle_buffer)
        buffer = []
        for sample in samples:
            if len(buffer) < size:
                buffer.append(sample)
                continue
            j = rng.randrange(size)
            buffer[j], sample = sample, buffer[j]
            yield sample

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        bad = BadSampleLog(self.data.max_bad_samples)
        # DataLoader hands out batches round robin from worker 0: the j-th batch it yields
        # (counted from this loader's start) comes from worker j % workers. Batch b of an
        # epoch is made by stream b % workers of that epoch, so in each epoch a worker plays
        # the stream whose batches land on its turns.
        yielded = 0
        for epoch in range(self.first_epoch, self.end_epoch):
            skip = self.skip_batches if epoch == self.first_epoch else 0
            stream_id = (worker + skip - yielded) % workers
            bad.new_epoch()
            yield from self._epoch(epoch, stream_id, workers, skip, bad)
            yielded += self.batches_per_rank - skip

    def _epoch(self, epoch: int, stream_id: int, workers: int, skip_batches: int,
               bad: BadSampleLog) -> Iterator[Batch]:
        order = list(self.shards)
        random.Random(f"{self.seed}/{epoch}/shards").shuffle(order)
        mine = order[self.rank::self.world_size][stream_id::workers]
        count = len(range(stream_id, self.batches_per_rank, workers))
        skip = len(range(stream_id, skip_batches, workers))
        stream = self._shuffled(self._cycle(mine, epoch, stream_id, bad), self._rng(epoch, stream_id, "buffer"))
        size = self.data.batch_size
        for b in range(count):
            raw = [next(stream) for _ in range(size)]
            if b < skip:  # resuming: the same samples are drawn, nothing is decoded
                continue
            slots = [self._decode(item, self._rng(epoch, stream_id, "sample", b * size + i), bad)
                     for i, item in enumerate(raw)]
            good = [i for i, decoded in enumerate(slots) if decoded is not None]
            if not good:
                raise KdscaleError(f"every sample of a batch is undecodable (e.g. {raw[0][0]} in {raw[0][3]}); "
                                   f"check the shards with `kdscale shards verify`")
            for i, decoded in enumerate(slots):
                if decoded is None:
                    # An undecodable image is replaced by the next good sample of the same
                    # batch, augmented afresh. The replacement never depends on the stream
                    # position, so a resumed run (which skips batches undecoded) draws the
                    # same samples as one that never stopped.
                    j = next((k for k in good if k > i), good[0])
                    raw[i] = raw[j]
                    slots[i] = self._decode(raw[j], self._rng(epoch, stream_id, "sample", b * size + i, "again"),
                                            bad)
            images = [s[0] if raw[i][4] is not None else s for i, s in enumerate(slots)]
            replayed = [s for i, s in enumerate(slots) if raw[i][4] is not None]
            indices = torch.tensor([item[5] for item in raw]) if self.sample_offsets is not None else None
            yield Batch(stack_views(images), torch.tensor([item[2] for item in raw]), [item[0] for item in raw],
                        bad.take(), torch.stack([s[1] for s in replayed]) if replayed else None, indices,
                        _stacked_features([s[2] for s in replayed]))

    def _decode(self, item: tuple, rng: random.Random, bad: BadSampleLog):
        return decode_or_skip(self.decoder, item, rng, bad, self.data.num_classes)


def _stacked_features(per_sample: list[dict]) -> dict[int, dict[str, torch.Tensor]] | None:
    """The samples' replayed features, ``{slot: {kind: (B, *shape)}}``; None without any."""
    if not per_sample or not per_sample[0]:
        return None
    return {slot: {kind: torch.stack([s[slot][kind] for s in per_sample]) for kind in kinds}
            for slot, kinds in per_sample[0].items()}


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
        bad = BadSampleLog(self.data.max_bad_samples)
        batch: list[tuple[str, torch.Tensor, int]] = []
        for item in valid_samples(_samples_of(mine, bad), self.data.num_classes, bad) if mine else ():
            image = decode_or_skip(self.decoder, item, None, bad)
            if image is None:
                continue
            batch.append((item[0], image, item[2]))
            if len(batch) == self.data.batch_size:
                yield self._collate(batch, bad.take())
                batch = []
        if batch or bad.pending:
            yield self._collate(batch, bad.take())

    def _collate(self, batch, bad_samples: int) -> Batch:
        if not batch:  # only reports the bad samples
            size = self.data.image_size
            return Batch(torch.zeros(0, 3, size, size), torch.zeros(0, dtype=torch.long), [], bad_samples)
        keys, images, labels = zip(*batch)
        return Batch(torch.stack(images), torch.tensor(labels), list(keys), bad_samples)


def check_shard_count(shards: list[str], key: str, world_size: int, workers: int) -> None:
    needed = world_size * max(1, workers)
    if len(shards) < needed:
        raise KdscaleError(
            f"{key}: {len(shards)} shards for {world_size} processes x {max(1, workers)} workers; every worker "
            f"needs its own shard. Write at least {needed} shards, or lower data.num_workers")


def worker_context():
    """Loader workers are forked from a clean forkserver, never from the training process:
    a fork of a process with live threads (wandb, OpenTelemetry, the watchdog) can copy a
    held lock into the child, which then hangs for good at start-up (seen here). The server
    imports this module (and torch) once, so a worker starts in milliseconds."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    start_multiprocessing_helpers()  # the server and the resource tracker never see the job's stop signals
    return context


def _init_worker(rank_pid: int, _worker_id: int) -> None:
    """Loader workers leave the stop signals (SIGINT, SIGTERM, SIGUSR1) to their rank: a
    terminal's Ctrl-C, ``scancel``, a time limit and Slurm's ``--signal`` reach every process
    of the job, and a worker that died of them would turn a clean stop into a crash. They
    already start with those signals blocked (forked from a server started that way,
    :mod:`kdscale.lifecycle.helpers`); ignoring them here keeps it so whatever the start. A
    worker that does not stop when the loader asks is ended by its rank's exit (SIGKILL).

    A forkserver worker's parent is the server, not its rank, and it holds the handle that
    keeps the server alive, so neither notices a rank killed with -9: a thread here ends
    the worker within 2 s of its rank (and the server follows)."""
    import threading
    import time

    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    setup_logging()

    def watch() -> None:
        while True:
            time.sleep(2.0)
            try:
                os.kill(rank_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass

    threading.Thread(target=watch, name="kdscale-rank-watch", daemon=True).start()


def make_loader(stream: IterableDataset, data: DataSection, pin_memory: bool) -> DataLoader:
    """A loader over a stream that batches itself; a worker that delivers no batch for
    ``data.loader_timeout_s`` is an error, not a hang."""
    workers = data.num_workers
    if workers == 0:
        return DataLoader(stream, batch_size=None, pin_memory=pin_memory)
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory, prefetch_factor=4,
                      multiprocessing_context=worker_context(), timeout=data.loader_timeout_s,
                      worker_init_fn=functools.partial(_init_worker, os.getpid()))
