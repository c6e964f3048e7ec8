"""The trainer's inputs: its loaders, the next batch (a stall is an error, not a hang), and
the batch on the device: decoded there under ``data.decode=gpu``, then mixed (Mixup/CutMix)
before any network sees it."""

from __future__ import annotations

import time

import torch

from kdscale.data.device_decode import EncodedBatch, decode_on_device
from kdscale.data.loader import TrainStream, ValStream, make_loader
from kdscale.data.mixing import batch_generator, mix_batch, mixing_enabled
from kdscale.errors import KdscaleError
from kdscale.log import EVERY_RANK, log
from kdscale.train.window import MetricsWindow


class TrainerInputs:
    """Where a trainer's batches come from and how they reach the device. It holds what it
    reads (declared here, not shared attributes of the trainer); the data position (epoch,
    batches done) is passed in by the loop."""

    def __init__(self, cfg, plan, runtime, rank: int, world: int, watchdog, teacher_outputs_dirs: list[str]):
        """``teacher_outputs_dirs``: the replayed teachers' output directories, in order (may be empty)."""
        self.cfg, self.plan, self.runtime, self.rank, self.world = cfg, plan, runtime, rank, world
        self.watchdog, self.teacher_outputs_dirs = watchdog, teacher_outputs_dirs

    def train_loader(self, epoch: int, batches_done: int):
        """This rank's stream of the epoch's training batches, after the ``batches_done`` already seen."""
        stream = TrainStream(self.plan.train_shards, self.cfg.data, seed=self.cfg.experiment.seed,
                             epoch=epoch, epochs=self.cfg.train.epochs, rank=self.rank, world_size=self.world,
                             batches_per_rank=self.plan.micro_batches_per_epoch, skip_batches=batches_done,
                             teacher_outputs=self.teacher_outputs_dirs, sample_offsets=self.plan.sample_offsets)
        return make_loader(stream, self.cfg.data, pin_memory=self.runtime.device.type == "cuda")

    def val_loader(self):
        stream = ValStream(self.plan.val_shards, self.cfg.data, rank=self.rank, world_size=self.world)
        return make_loader(stream, self.cfg.data, pin_memory=self.runtime.device.type == "cuda")

    def next_batch(self, loader, window: MetricsWindow):
        fetch_start = time.perf_counter()
        with self.watchdog.waiting("waiting for a batch from the data loader"):
            try:
                batch = next(loader)
            except RuntimeError as err:
                if "timed out" not in str(err):
                    raise
                raise KdscaleError(f"a data loader worker of rank {self.rank} delivered no batch for "
                                   f"{self.cfg.data.loader_timeout_s:g} s (data.loader_timeout_s): {err}") from None
        if isinstance(batch.images, EncodedBatch):  # data.decode=gpu: decoded here, on the device
            batch = self._decoded_on_device(batch)
        window.wait += time.perf_counter() - fetch_start
        window.bad_samples_epoch += batch.bad_samples
        return batch

    def on_device(self, batch, epoch: int, batches_done: int):
        """The micro-batch on the device, mixed (Mixup/CutMix) before any network sees it:
        (images, targets, the replayed teachers' outputs or None, dataset indices or None).
        Replayed outputs are a :class:`~kdscale.data.teacher_outputs.Replayed`: their
        probabilities are mixed with the images; their features (float32 on the device) never
        are (setup refuses replayed features with mixing)."""
        from kdscale.data.teacher_outputs import Replayed

        device = self.runtime.device
        images = batch.images.to(device, non_blocking=True)
        if self.runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = batch.targets.to(device, non_blocking=True)
        probs = batch.teacher_probs.to(device, non_blocking=True) if batch.teacher_probs is not None else None
        features = {slot: {kind: value.to(device, non_blocking=True).float() for kind, value in kinds.items()}
                    for slot, kinds in (batch.teacher_features or {}).items()}
        if mixing_enabled(self.cfg.data):  # never with replayed features: setup refuses them with mixing
            gen = batch_generator(self.cfg.experiment.seed, self.rank, epoch, batches_done)
            images, targets, probs = mix_batch(images, targets, self.cfg.data, gen, probs)
        indices = batch.indices.to(device, non_blocking=True) if batch.indices is not None else None
        replayed = Replayed(probs, features) if probs is not None or features else None
        return images, targets, replayed, indices

    def _decoded_on_device(self, batch):
        """The batch with its images decoded on the device; an image the device cannot decode
        is replaced within the batch (as the CPU path does), named and counted as bad."""
        images, undecodable = decode_on_device(batch.images, self.cfg.data, self.runtime.device)
        for i in undecodable:
            log.warning(f"skipped sample {batch.keys[i]}: the device could not decode it (replaced by another "
                        f"image of its batch)", extra=EVERY_RANK)
        return batch._replace(images=images, bad_samples=batch.bad_samples + len(undecodable))
