"""Loader throughput on the same JPEGs, augmentation, batch and worker count:

- kdscale's webdataset training stream (random-resized crop + flip, normalised);
- torchvision ``ImageFolder`` + ``DataLoader`` with the equivalent transforms, over the same
  images extracted to a class-folder tree;
- kdscale's replay stream from teacher-output shards (stored crop + soft label).
"""

from __future__ import annotations

import os

import torch

from kdscale.bench.timing import (
    interleaved_rounds,
    ratio_over_rounds,
    throughput_summary,
)
from kdscale.config.schema import DataSection
from kdscale.data.loader import TrainStream, _samples_of, make_loader
from kdscale.data.shards import expand_shards


def extract_to_folder(shards: list[str], root: str) -> int:
    count = 0
    for sample in _samples_of(shards):
        folder = os.path.join(root, f"class{int(sample['cls']):04d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, sample["__key__"].replace("/", "_") + ".jpg"), "wb") as fh:
            fh.write(sample["jpg"])
        count += 1
    return count


def bench_data(data_dir: str, image_size: int, batch: int, workers: int, batches: int, rounds: int,
               num_classes: int, teacher_outputs: str | None) -> dict:
    """Loader images/s per round and the per-round ratios between loaders (median and IQR)."""
    import torchvision
    from torchvision import transforms

    shards = expand_shards(os.path.join(data_dir, "train-*.tar"), "bench data")
    folder = os.path.join(data_dir, "imagefolder")
    if not os.path.isdir(folder):
        extract_to_folder(shards, folder)
    section = DataSection(num_classes=num_classes, image_size=image_size, augment="imagenet", batch_size=batch,
                          num_workers=workers, shuffle_buffer=1000)
    normalize = transforms.Normalize(section.mean, section.std)
    dataset = torchvision.datasets.ImageFolder(folder, transforms.Compose([
        transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]))

    def epoch_of(make):
        def run():
            for i, _ in enumerate(make()):
                if i + 1 == batches:
                    break
        return run

    def kdscale_loader(outputs=None):
        stream = TrainStream(shards, section, seed=0, epoch=0, rank=0, world_size=1, batches_per_rank=batches,
                             teacher_outputs=[outputs] if outputs else None)
        return make_loader(stream, section, pin_memory=False)

    def folder_loader():
        return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                           drop_last=True, prefetch_factor=4 if workers else None)

    candidates = {"kdscale_webdataset": (epoch_of(kdscale_loader), batch * batches),
                  "torchvision_imagefolder": (epoch_of(folder_loader), batch * batches)}
    if teacher_outputs:
        candidates["kdscale_teacher_shard_replay"] = (epoch_of(lambda: kdscale_loader(teacher_outputs)),
                                                      batch * batches)
    startup = worker_startup(kdscale_loader, section) if workers else None
    samples = interleaved_rounds(candidates, torch.device("cpu"), steps=1, rounds=rounds, warmup=1)
    ratios = {"webdataset_vs_imagefolder": ratio_over_rounds(samples["kdscale_webdataset"],
                                                             samples["torchvision_imagefolder"])}
    if teacher_outputs:
        ratios["replay_vs_webdataset"] = ratio_over_rounds(samples["kdscale_teacher_shard_replay"],
                                                           samples["kdscale_webdataset"])
    return {"throughput": throughput_summary(samples), "ratios": ratios, "workers": workers, "batch": batch,
            "image_size": image_size, "worker_startup_s": startup}


def worker_startup(make_loader_fn, section: DataSection, repeats: int = 3) -> dict[str, float]:
    """Seconds from a new loader to its first batch: kdscale's forkserver workers (the
    server is started by the first loader of a process and reused) against plain fork."""
    import time

    def first_batch(loader) -> float:
        start = time.perf_counter()
        iterator = iter(loader)
        next(iterator)
        del iterator
        return time.perf_counter() - start

    first_batch(make_loader_fn())  # the forkserver starts once per process
    forkserver = min(first_batch(make_loader_fn()) for _ in range(repeats))
    stream = make_loader_fn().dataset
    fork = min(first_batch(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=section.num_workers,
                                                       multiprocessing_context="fork")) for _ in range(repeats))
    return {"forkserver": forkserver, "fork": fork}
