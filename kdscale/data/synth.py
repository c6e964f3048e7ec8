"""A synthetic image-classification dataset written as webdataset tar shards.

Each class has a fixed random colour layout (a coarse grid upsampled to the image size).
A sample blends its class layout with a random distractor layout, a random shift and
pixel noise, then is JPEG-encoded like ImageNet. The classes are learnable but not
trivial: a small CNN needs a few epochs, and a bigger one does better, which is what a
teacher/student demo needs.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

from kdscale.data.shards import INDEX_FILE, shard_record
from kdscale.progress import progress_bar


def _layouts(rng: np.random.Generator, count: int, grid: int, size: int) -> np.ndarray:
    coarse = rng.uniform(0, 255, size=(count, grid, grid, 3)).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.BICUBIC), dtype=np.float32)
                     for c in coarse])


def synth_image(class_layout: np.ndarray, rng: np.random.Generator, distractors: np.ndarray,
                difficulty: float) -> np.ndarray:
    size = class_layout.shape[0]
    shift = rng.integers(-size // 8, size // 8 + 1, size=2)
    base = np.roll(class_layout, tuple(shift), axis=(0, 1))
    distractor = distractors[rng.integers(len(distractors))]
    weight = rng.uniform(0.35, 0.65) * (1.0 - difficulty) + difficulty * 0.25
    noise = rng.normal(0, 25 * (0.5 + difficulty), size=base.shape)
    image = weight * base + (1 - weight) * distractor + noise
    return np.clip(image, 0, 255).astype(np.uint8)


def write_synthetic_shards(out_dir: str, num_classes: int = 10, train_samples: int = 5000,
                           val_samples: int = 1000, image_size: int = 32, samples_per_shard: int = 500,
                           difficulty: float = 0.5, seed: int = 0, progress: bool = True) -> dict:
    """Write ``train-NNNNNN.tar`` and ``val-NNNNNN.tar`` shards and ``index.json``.

    The index records each shard's sample count, byte size and sha256 (the same
    ``records`` as ``shards from-folder``), so ``shards verify`` can tell a damaged or
    truncated shard from a sound one.
    """
    import webdataset as wds
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    layouts = _layouts(rng, num_classes, 4, image_size)
    distractors = _layouts(rng, 64, 4, image_size)
    index = {"num_classes": num_classes, "image_size": image_size, "generator": "kdscale synth",
             "seed": seed, "splits": {}}
    for split, count in (("train", train_samples), ("val", val_samples)):
        split_rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        shards, records = [], []
        bar = progress_bar(total=count, desc=f"synth {split}", unit="img", disable=not progress)
        for start in range(0, count, samples_per_shard):
            name = f"{split}-{len(shards):06d}.tar"
            tmp = os.path.join(out_dir, name + ".tmp")
            with wds.TarWriter(tmp) as sink:
                for i in range(start, min(start + samples_per_shard, count)):
                    label = int(split_rng.integers(num_classes))
                    pixels = synth_image(layouts[label], split_rng, distractors, difficulty)
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                    sink.write({"__key__": f"{split}{i:08d}", "jpg": buffer.getvalue(), "cls": str(label)})
                    bar.update(1)
            records.append(shard_record(tmp, min(start + samples_per_shard, count) - start) | {"name": name})
            os.replace(tmp, os.path.join(out_dir, name))
            shards.append(name)
        bar.close()
        last = len(shards) - 1
        index["splits"][split] = {"samples": count, "shards": shards, "records": records,
                                  "pattern": f"{split}-{{000000..{last:06d}}}.tar"}
    tmp_index = os.path.join(out_dir, INDEX_FILE + ".tmp")
    with open(tmp_index, "w") as fh:
        json.dump(index, fh, indent=2)
    os.replace(tmp_index, os.path.join(out_dir, INDEX_FILE))
    return index
