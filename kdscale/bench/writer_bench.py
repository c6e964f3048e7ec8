"""The teacher-output writer (``kdscale.teach``) against the teacher's own batched inference,
side by side in one run: same teacher network, device, precision, memory format and batch
(the writer's crops per forward).

- **writer**: a whole write of the companions of ``shards`` image shards into an emptied
  folder (loader workers started, images decoded and cropped, teacher, top-k, records
  written and renamed), counted as images x R crops per second;
- **teacher inference**: the teacher's forward on a batch already on the device, as many
  forwards as the writer makes, counted as crops per second.

Their per-round ratio (``writer_vs_teacher_inference``; goal >= 0.8) says how much of the
teacher's speed the writer keeps. Model building is outside both timings.
"""

from __future__ import annotations

import math
import os
import shutil

import torch

from kdscale.bench.timing import (
    interleaved_rounds,
    ratio_over_rounds,
    throughput_summary,
)


def bench_writer(data_dir: str, out: str, *, teacher: str, image_size: int, batch: int, num_classes: int,
                 device: str, workers: int, rounds: int, crops: int = 4, top_k: int = 5, shards: int = 8,
                 warmup: int = 1) -> dict:
    from kdscale.config import load_config
    from kdscale.data.shards import expand_shards
    from kdscale.parallel.context import DistContext
    from kdscale.teach.writer import TeacherOutputWriter

    names = [os.path.basename(p) for p in expand_shards(os.path.join(data_dir, "train-*.tar"), "bench data")][:shards]
    outputs = os.path.join(out, "writer-bench-outputs")
    cfg = load_config(None, [f"data.train_shards={data_dir}/{{{','.join(names)}}}", f"data.num_classes={num_classes}",
                             f"data.image_size={image_size}", "data.augment=imagenet", f"data.batch_size={batch}",
                             f"data.num_workers={workers}", "method.name=kd", f"teacher.name={teacher}",
                             f"teacher.outputs={outputs}", f"teacher.crops_per_image={crops}", f"teacher.top_k={top_k}",
                             "wandb.mode=disabled"])
    dev = torch.device(device)
    writer = TeacherOutputWriter(cfg, DistContext(0, 1, 0, dev))
    counts = [_count(os.path.join(data_dir, name)) for name in names]
    forwards = sum(math.ceil(n / writer.images_per_chunk) for n in counts)
    size = writer.crops_per_forward

    def write() -> None:
        shutil.rmtree(outputs, ignore_errors=True)
        summary = writer.run()
        if summary["samples_written"] != sum(counts):
            raise RuntimeError(f"the writer wrote {summary['samples_written']} of {sum(counts)} samples")

    inputs = torch.randn(size, 3, image_size, image_size, device=dev)
    if writer.runtime.channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)

    def infer() -> None:
        for _ in range(forwards):
            writer.teacher(inputs)

    candidates = {"writer": (write, sum(counts) * crops), "teacher_inference": (infer, forwards * size)}
    samples = interleaved_rounds(candidates, dev, steps=1, rounds=rounds, warmup=warmup)
    shutil.rmtree(outputs, ignore_errors=True)
    return {"throughput": throughput_summary(samples),  # crops per second
            "ratios": {"writer_vs_teacher_inference": ratio_over_rounds(samples["writer"],
                                                                        samples["teacher_inference"])},
            "images": sum(counts), "crops_per_image": crops, "crops_per_forward": size, "forwards": forwards,
            "workers": workers, "device": device, "autocast": str(writer.runtime.autocast_dtype),
            "channels_last": writer.runtime.channels_last}


def _count(shard: str) -> int:
    from kdscale.data.tar_reader import iter_samples

    return sum(1 for _ in iter_samples(shard))
