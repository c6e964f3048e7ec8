"""Run the frozen teacher over the training shards once and write teacher-output shards
(format: :mod:`kdscale.data.teacher_outputs`).

Every rank takes the image shards ``rank::world`` and writes one companion shard per image
shard. Images are decoded and cropped in DataLoader workers (:mod:`kdscale.teach.crops`),
which split the rank's shards; the rank runs the teacher on chunks of
``ceil(data.batch_size / R)`` images, i.e. at least ``data.batch_size`` crops per forward
(autocast and channels-last on GPU, as :class:`Runtime` decides), one chunk in flight
while the previous one's records are written. A teacher whose ``targets`` name summary or
spatial features stores them too (float16; probabilities only with ``logits`` among its
targets), and the bytes per image and for the training set are logged before any work.
Crops are seeded by (experiment.seed, sample key) and chunks are counted from each shard's
start, so the records do not depend on the rank, the worker or an earlier interruption.

A companion is written under ``.tmp`` and renamed when complete; a rerun skips finished
companions. On SIGINT, SIGTERM, SIGUSR1 or the preemption file (``train.preempt_file`` or
``$KDSCALE_PREEMPT_FILE``) the rank stops after the chunk in hand: every companion it had
open is kept as ``<name>.tar.partial``, a complete tar of its first records (whole chunks),
and the rerun copies those records and continues the shard from there, which yields the
same companion as a write that never stopped. Members carry a fixed mtime, so equal
records give equal bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import torch

from kdscale.config.schema import ExperimentConfig
from kdscale.data.shards import expand_shards, samples_from_index
from kdscale.data.teacher_outputs import (
    META_FILE,
    check_same_settings,
    companion_path,
    encode_record,
    record_bytes,
)
from kdscale.errors import KdscaleError
from kdscale.lifecycle.job import JobStop
from kdscale.lifecycle.watchdog import Watchdog
from kdscale.log import EVERY_RANK, human_bytes, log
from kdscale.models import build_model
from kdscale.parallel.context import DistContext
from kdscale.progress import progress_bar
from kdscale.runtime.device import Runtime
from kdscale.teach.crops import CropChunk, CropStream
from kdscale.teach.sink import PARTIAL, TMP, CompanionSink, count_records
from kdscale.teachers.frozen import FrozenTeacher
from kdscale.teachers.views import teacher_view


def _indexed_samples(shards: list[str]) -> int | None:
    """The shards' samples as ``index.json`` beside them counts them (the split's total, or
    the sum of its per-shard records for a subset); None when it does not."""
    total = samples_from_index(shards, "train")
    path = os.path.join(os.path.dirname(shards[0]), "index.json")
    if total is not None or not os.path.isfile(path):
        return total
    with open(path) as fh:
        records = {r["name"]: r["samples"] for r in json.load(fh).get("splits", {}).get("train", {}).get("records", [])}
    names = [os.path.basename(s) for s in shards]
    return sum(records[n] for n in names) if all(n in records for n in names) else None


def check_teach_config(cfg: ExperimentConfig) -> None:
    """What kdscale.teach needs of the config, checked before the job takes any directory."""
    spec = cfg.only_teacher("kdscale.teach (it writes one teacher's outputs per run)")
    if spec is None or not spec.name:
        raise KdscaleError("kdscale.teach needs a teacher: set teacher.name and teacher.weights")
    if not spec.outputs:
        raise KdscaleError("kdscale.teach needs teacher.outputs: the directory to write teacher-output shards to")
    if cfg.data.augment != "imagenet":
        raise KdscaleError("teacher-output shards store random-resized crops; set data.augment=imagenet")


class TeacherOutputWriter:
    def __init__(self, cfg: ExperimentConfig, ctx: DistContext, watchdog: Watchdog | None = None,
                 stop: JobStop | None = None):
        check_teach_config(cfg)
        spec = cfg.only_teacher("kdscale.teach")
        self.cfg, self.ctx, self.spec = cfg, ctx, spec
        self.watchdog = watchdog or Watchdog(cfg.train.stall_timeout_s, ctx.rank)  # not started: no thread
        self.stop = stop
        self.runtime = Runtime.from_config(cfg, ctx.device)
        from kdscale.models.feature_targets import FeatureTargets
        from kdscale.train.teacher_setup import feature_kinds, teacher_classes, teacher_kinds

        self.classes = teacher_classes(cfg, spec)
        model = build_model(spec.name, self.classes, spec.weights, where="teacher",
                            timm_options=spec.timm_options)
        self.view = teacher_view(cfg.data, spec)  # the teacher's own mean/std/size, as in training
        self.logits, kinds = "logits" in teacher_kinds(spec), feature_kinds(spec)
        targets = FeatureTargets(model, kinds, where="teacher", spatial_layer=spec.spatial_layer,
                                 summary_layer=spec.summary_layer, logits=self.logits) if kinds else None
        self.shapes = targets.shapes(self.view.target.input_size) if targets else {}
        """Each stored feature kind's shape per crop."""
        self.top_k = spec.top_k if self.logits else 0  # features only: no probabilities stored
        self.teacher = FrozenTeacher(model, [], ctx.device, self.runtime.autocast_dtype, self.runtime.channels_last,
                                     view=self.view, targets=targets)
        self.shards = expand_shards(cfg.data.train_shards, "data.train_shards")
        self.images_per_chunk = math.ceil(cfg.data.batch_size / spec.crops_per_image)
        self._mean, self._std = (torch.as_tensor(v, dtype=torch.float32, device=ctx.device).view(-1, 1, 1)
                                 for v in (cfg.data.mean, cfg.data.std))

    @property
    def crops_per_forward(self) -> int:
        return self.images_per_chunk * self.spec.crops_per_image

    # -- stopping ----------------------------------------------------------------------
    def stop_requested(self) -> bool:
        """A stop signal here, or the preemption file (looked for at most once a second)."""
        if self.stop is None:
            return False
        now = time.monotonic()
        if now - self._preempt_checked > 1.0:
            self._preempt_checked = now
            self.stop.look_for_file()
        return self.stop.requested_here

    # -- the teacher -------------------------------------------------------------------
    def _launch(self, chunk: CropChunk):
        """Start the teacher on a chunk's views; returns its top-k and its feature targets as
        float16 (on the CPU once ready) and the event that says so (None off CUDA)."""
        views = chunk.views.to(self.ctx.device, non_blocking=True).float().div_(255)
        views = views.sub_(self._mean).div_(self._std)  # torchvision's normalize, its constants made once
        if self.runtime.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        output = self.teacher(views)
        if self.logits:
            probs = torch.softmax(output.logits.float(), dim=1)
            top = probs.topk(min(self.top_k, probs.shape[1]), dim=1)
            values, indices = top.values.half(), top.indices.int()
        else:
            values = indices = torch.zeros(len(views), 0, device=views.device)
        features = {kind: value.half() for kind, value in output.member_features.get("", {}).items()}
        if self.ctx.device.type != "cuda":
            return values, indices, features, None
        values, indices = values.to("cpu", non_blocking=True), indices.to("cpu", non_blocking=True)
        features = {kind: value.to("cpu", non_blocking=True) for kind, value in features.items()}
        event = torch.cuda.Event()
        event.record()
        return values, indices, features, event

    def _drain(self) -> None:
        """Write the records of the chunk in flight."""
        import numpy as np

        if self._pending is None:
            return
        chunk, (values, indices, features, event) = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        probs, classes = values.numpy(), indices.numpy()
        features = {kind: value.numpy() for kind, value in features.items()}
        for kind, value in features.items():
            if not np.isfinite(value).all():
                raise KdscaleError(f"teacher {self.spec.name}: its {kind} features on a crop of shard "
                                   f"{self.work[chunk.shard][0]} are not finite in float16 (beyond its range of "
                                   f"65504, or NaN); they cannot be stored: use the teacher online")
        crops, flips = chunk.crops.numpy(), chunk.flips.numpy()
        sink, top_k, at = self._sink(chunk), self.top_k, 0
        for key, count in zip(chunk.keys, chunk.counts):
            part = slice(at, at + count)
            if count:
                record = encode_record(crops[part], flips[part], probs[part], classes[part],
                                       {kind: value[part] for kind, value in features.items()})
            else:  # the loader will skip this sample; the record keeps the keys aligned
                record = encode_record(np.zeros((0, 4), np.float32), np.zeros(0, np.uint8),
                                       np.zeros((0, top_k), np.float16), np.zeros((0, top_k), np.int32),
                                       {kind: np.zeros((0, *shape), np.float16) for kind, shape in self.shapes.items()})
            sink.write(key, record)
            at += count
        self.produced += len(chunk.keys)
        self.skipped += chunk.counts.count(0)
        self.bar.update(len(chunk.keys))

    def _sink(self, chunk: CropChunk) -> CompanionSink:
        sink = self.sinks.get(chunk.shard)
        if sink is None:
            shard, start = self.work[chunk.shard]
            sink = self.sinks[chunk.shard] = CompanionSink(companion_path(shard, self.spec.outputs), start)
        if chunk.start != sink.written or chunk.previous_key != sink.last_key:
            raise KdscaleError(f"teacher outputs of {self.work[chunk.shard][0]} out of step: chunk at sample "
                               f"{chunk.start} after key {chunk.previous_key!r}, the companion holds {sink.written} "
                               f"records ending at {sink.last_key!r}; delete its {PARTIAL} file and rerun")
        return sink

    def _take(self, chunk: CropChunk) -> None:
        if chunk.end:
            self._drain()
            self._sink(chunk).finish()
            del self.sinks[chunk.shard]
            self.finished += 1
            return
        launched = self._launch(chunk)
        self._drain()
        self._pending = (chunk, launched)

    # -- the run -----------------------------------------------------------------------
    def _plan(self, mine: list[str]) -> list[tuple[str, int]]:
        """(shard, records already in its partial) of the shards without a companion."""
        work = []
        for shard in mine:
            target = companion_path(shard, self.spec.outputs)
            if os.path.isfile(target):
                if os.path.exists(target + PARTIAL):  # finished, but stopped before the partial went
                    os.remove(target + PARTIAL)
                continue
            work.append((shard, count_records(target + PARTIAL) if os.path.isfile(target + PARTIAL) else 0))
        return work

    def _loader(self):
        from kdscale.data.loader import make_loader

        data = self.cfg.data
        stream = CropStream(self.work, num_classes=data.num_classes, image_size=data.image_size,
                            crops=self.spec.crops_per_image, seed=self.cfg.experiment.seed,
                            images_per_chunk=self.images_per_chunk, labels_required=data.labels == "required")
        workers = min(data.num_workers, len(self.work))
        return make_loader(stream, dataclasses.replace(data, num_workers=workers),
                           pin_memory=self.ctx.device.type == "cuda")

    def _meta(self) -> dict:
        return {"teacher": self.spec.name, "weights": self.spec.weights, "crops_per_image": self.spec.crops_per_image,
                "top_k": self.top_k, "image_size": self.cfg.data.image_size, "seed": self.cfg.experiment.seed,
                "num_classes": self.cfg.data.num_classes, "softmax_temperature": 1.0,
                "teacher_preprocessing": self.view.target.as_meta(),
                "targets": ["logits"] * self.logits + list(self.shapes),
                "target_shapes": {kind: list(shape) for kind, shape in self.shapes.items()},
                "feature_dtype": "float16",
                "image_shards": [os.path.basename(s) for s in self.shards]}

    def storage(self) -> tuple[int, int | None]:
        """(bytes per sample in a companion, bytes for the training set or None when no
        index.json counts it), printed before any work: stored spatial maps can reach terabytes."""
        per_sample = record_bytes(self.spec.crops_per_image, min(self.top_k, self.classes), self.shapes)
        samples = _indexed_samples(self.shards)
        parts = ([f"top-{self.top_k} probabilities"] if self.top_k else []) + \
            [f"{kind} {'x'.join(map(str, shape))} float16" for kind, shape in self.shapes.items()]
        total = f"{human_bytes(per_sample * samples)} for the {samples} training images" if samples else \
            "no index.json counts the training images: multiply by their number"
        log.info(f"teacher outputs: {per_sample} bytes ({human_bytes(per_sample)}) per image "
                 f"({self.spec.crops_per_image} crops x ({', '.join(parts)}) + crop boxes); {total}")
        return per_sample, per_sample * samples if samples else None

    def _write_meta(self) -> None:
        meta = self._meta()
        path = os.path.join(self.spec.outputs, META_FILE)
        with open(path + TMP, "w") as fh:
            json.dump(meta, fh, indent=2)
        os.replace(path + TMP, path)

    def _stream(self) -> bool:
        """Feed the loader's chunks through the teacher; True when stopped early."""
        iterator = iter(self._loader())
        try:
            while True:
                try:
                    with self.watchdog.waiting("waiting for crops from the data loader"):
                        chunk = next(iterator)
                except StopIteration:
                    return False
                except Exception:
                    if not self.stop_requested():
                        raise
                    break  # the signal also reached (and ended) the loader workers
                with self.watchdog.waiting("running the teacher and writing its records"):
                    self._take(chunk)
                self.watchdog.progress()
                if self.stop_requested():
                    break
            self._drain()
            return True
        finally:
            del iterator  # ends the loader workers

    def run(self) -> dict:
        per_sample, dataset_bytes = self.storage()
        os.makedirs(self.spec.outputs, exist_ok=True)
        check_same_settings(self.spec.outputs, self._meta())
        if self.ctx.is_main:
            self._write_meta()
        mine = self.shards[self.ctx.rank::self.ctx.world_size]
        self.work = self._plan(mine)
        self.sinks: dict[int, CompanionSink] = {}
        self._pending, self.produced, self.skipped, self.finished = None, 0, 0, 0
        self._preempt_checked = -math.inf
        total = samples_from_index(self.shards, "train")
        per_shard = (total or 0) / max(1, len(self.shards))
        resumed = sum(start for _, start in self.work)
        self.bar = progress_bar(total=round(per_shard * len(self.work)) or None, initial=resumed,
                                desc=f"teach (rank {self.ctx.rank})", unit="img", disable=not self.ctx.is_main)
        try:
            stopped = bool(self.work) and (self.stop_requested() or self._stream())
        except BaseException:
            for sink in self.sinks.values():
                sink.abandon()
            raise
        finally:
            self.bar.close()
        for sink in self.sinks.values():  # stopped: keep the records written so far (whole chunks)
            sink.keep_partial()
        if self.sinks:
            log.info(f"rank {self.ctx.rank}: stopped inside {len(self.sinks)} shard(s); their records so far are "
                     f"kept in {PARTIAL} files and the next run continues them", extra=EVERY_RANK)
        local = [self.produced, self.finished, len(mine) - len(self.work), len(self.sinks), self.skipped,
                 float(stopped)]
        with self.watchdog.waiting("waiting for the other ranks to finish their shards"):
            counts = self.ctx.all_reduce(torch.tensor(local, dtype=torch.float64, device=self.ctx.device), "sum")
            self.ctx.barrier()
        return {"samples_written": int(counts[0]), "shards_written": int(counts[1]), "shards_reused": int(counts[2]),
                "shards_partial": int(counts[3]), "samples_without_crops": int(counts[4]),
                "ranks_stopped": int(counts[5]), "outputs": self.spec.outputs, "bytes_per_sample": per_sample,
                "dataset_bytes": dataset_bytes}
