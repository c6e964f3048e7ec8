"""Run the frozen teacher over the training shards once and write teacher-output shards
(format: :mod:`kdscale.data.teacher_outputs`).

Every rank takes the image shards ``rank::world`` and writes one companion shard per image
shard, under ``.tmp`` and renamed when complete; a rerun skips finished companions, so an
interrupted job resumes. Crops follow the config's random-resized-crop augmentation and are
seeded by (experiment.seed, sample key), so they do not depend on rank or order.
"""

from __future__ import annotations

import io
import json
import os

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from kdscale.config.schema import ExperimentConfig
from kdscale.log import log
from kdscale.data.loader import DECODE_ERRORS, BadSample, parse_sample
from kdscale.data.shards import expand_shards, samples_from_index
from kdscale.data.teacher_outputs import META_FILE, companion_path, crop_boxes, encode_record, replay_crop
from kdscale.runtime.context import DistContext
from kdscale.errors import KdscaleError
from kdscale.models import build_model
from kdscale.progress import progress_bar
from kdscale.runtime.device import Runtime
from kdscale.runtime.teachers import FrozenTeacher


class TeacherOutputWriter:
    def __init__(self, cfg: ExperimentConfig, ctx: DistContext):
        spec = cfg.teacher
        if spec is None or not spec.name:
            raise KdscaleError("kdscale.teach needs a teacher: set teacher.name and teacher.weights")
        if not spec.outputs:
            raise KdscaleError("kdscale.teach needs teacher.outputs: the directory to write teacher-output shards to")
        if cfg.data.augment != "imagenet":
            raise KdscaleError("teacher-output shards store random-resized crops; set data.augment=imagenet")
        self.cfg, self.ctx, self.spec = cfg, ctx, spec
        self.runtime = Runtime.from_config(cfg, ctx.device)
        model = build_model(spec.name, spec.num_classes or cfg.data.num_classes, spec.weights, where="teacher")
        self.teacher = FrozenTeacher(model, [], ctx.device, self.runtime.autocast_dtype, self.runtime.channels_last)
        self.shards = expand_shards(cfg.data.train_shards, "data.train_shards")

    def _views(self, jpeg: bytes, key: str):
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        crops, flips = crop_boxes(key, image.width, image.height, self.spec.crops_per_image, self.cfg.experiment.seed)
        data = self.cfg.data
        views = [TF.normalize(replay_crop(image, box, bool(flip), data.image_size).float().div_(255), data.mean,
                              data.std) for box, flip in zip(crops, flips)]
        return torch.stack(views), crops, flips

    def _predict(self, views: torch.Tensor):
        out = []
        for chunk in views.split(self.cfg.data.batch_size):
            chunk = chunk.to(self.ctx.device, non_blocking=True)
            if self.runtime.channels_last:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            out.append(torch.softmax(self.teacher(chunk).logits.float(), dim=1).cpu())
        probs = torch.cat(out)
        top = probs.topk(min(self.spec.top_k, probs.shape[1]), dim=1)
        return top.values.half().numpy(), top.indices.int().numpy()

    def write_shard(self, shard: str, bar) -> int:
        import numpy as np
        import webdataset as wds

        from kdscale.data.tar_reader import iter_samples

        target = companion_path(shard, self.spec.outputs)
        tmp, count = target + ".tmp", 0
        with wds.TarWriter(tmp) as sink:
            for sample in iter_samples(shard):
                key = sample["__key__"]
                try:
                    _key, jpeg, _label = parse_sample(sample, self.cfg.data.num_classes)
                    views, crops, flips = self._views(jpeg, key)
                    probs, classes = self._predict(views)
                except (BadSample, *DECODE_ERRORS):
                    # The loader will skip this sample; keep the record so the keys stay aligned.
                    crops, flips = np.zeros((0, 4), np.float32), np.zeros(0, np.uint8)
                    probs, classes = np.zeros((0, self.spec.top_k), np.float16), np.zeros((0, self.spec.top_k), np.int32)
                sink.write({"__key__": key, **encode_record(crops, flips, probs, classes)})
                count += 1
                bar.update(1)
        os.replace(tmp, target)
        return count

    def run(self) -> dict:
        os.makedirs(self.spec.outputs, exist_ok=True)
        if self.ctx.is_main:
            meta = {"teacher": self.spec.name, "weights": self.spec.weights, "crops_per_image": self.spec.crops_per_image,
                    "top_k": self.spec.top_k, "image_size": self.cfg.data.image_size, "seed": self.cfg.experiment.seed,
                    "num_classes": self.cfg.data.num_classes, "softmax_temperature": 1.0,
                    "image_shards": [os.path.basename(s) for s in self.shards]}
            path = os.path.join(self.spec.outputs, META_FILE)
            with open(path + ".tmp", "w") as fh:
                json.dump(meta, fh, indent=2)
            os.replace(path + ".tmp", path)
        mine = self.shards[self.ctx.rank::self.ctx.world_size]
        todo = [s for s in mine if not os.path.isfile(companion_path(s, self.spec.outputs))]
        total = samples_from_index(self.shards, "train")
        per_shard = (total or 0) / max(1, len(self.shards))
        bar = progress_bar(total=round(per_shard * len(todo)) or None, desc=f"teach (rank {self.ctx.rank})", unit="img",
                   disable=not self.ctx.is_main)
        written = sum(self.write_shard(shard, bar) for shard in todo)
        bar.close()
        counts = self.ctx.all_reduce(torch.tensor([written, len(todo), len(mine) - len(todo)], dtype=torch.float64,
                                                  device=self.ctx.device), "sum")
        self.ctx.barrier()
        return {"samples_written": int(counts[0]), "shards_written": int(counts[1]), "shards_reused": int(counts[2]),
                "outputs": self.spec.outputs}


def teach(cfg: ExperimentConfig) -> dict:
    import time

    from kdscale.config import config_to_dict
    from kdscale.runtime.tracking import Tracker

    ctx = DistContext.from_env(cfg.distributed.timeout_s)
    tracker = None
    failed = True
    try:
        tracker = Tracker(cfg, config_to_dict(cfg), None, ctx.is_main, job_type="teach")
        start = time.perf_counter()
        summary = TeacherOutputWriter(cfg, ctx).run()
        summary["images_per_s"] = summary["samples_written"] / max(1e-9, time.perf_counter() - start)
        tracker.log({"teach/samples_written": summary["samples_written"],
                     "teach/shards_written": summary["shards_written"],
                     "perf/images_per_s": summary["images_per_s"]}, 0)
        failed = False
    finally:  # flush the tracker and end the process group, also after a failure
        if tracker is not None:
            tracker.finish(failed=failed)
        ctx.shutdown()
    log.info(f"teacher outputs: {summary['samples_written']} samples in {summary['shards_written']} new "
             f"shards ({summary['shards_reused']} already done) in {summary['outputs']}")
    return summary
