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


def pink_noise(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance colour noise with a 1/f amplitude spectrum, the falloff of natural
    images (Field 1987): JPEG spends on it about what it spends on a photograph."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    falloff = np.sqrt(fx ** 2 + fy ** 2)
    falloff[0, 0] = 1.0
    shape = (3, height, width // 2 + 1)
    spectrum = (rng.normal(size=shape) + 1j * rng.normal(size=shape)) / falloff
    noise = np.fft.irfft2(spectrum, s=(height, width)).transpose(1, 2, 0)
    return ((noise - noise.mean()) / noise.std()).astype(np.float32)


class PhotoLikeImages:
    """ImageNet-like sizes and JPEG sizes: sides around 500x375 (log-normal scale; 3/4
    landscape 4:3, the rest portrait or square), the class layout under 1/f texture,
    quality 90: about 110 KB per image, as ImageNet's train set averages."""

    TEXTURES, TEXTURE_SIDE = 16, 704

    def __init__(self, num_classes: int, rng: np.random.Generator):
        self.layouts = rng.uniform(0, 255, size=(num_classes, 4, 4, 3)).astype(np.uint8)
        self.textures = [pink_noise(self.TEXTURE_SIDE, self.TEXTURE_SIDE, rng) for _ in range(self.TEXTURES)]

    def size(self, rng: np.random.Generator) -> tuple[int, int]:
        long_side = int(np.clip(round(500 * np.exp(rng.normal(0, 0.2))), 256, self.TEXTURE_SIDE))
        short_side = long_side if rng.random() < 0.1 else round(long_side * 3 / 4)
        return (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)

    def __call__(self, label: int, rng: np.random.Generator) -> np.ndarray:
        width, height = self.size(rng)
        layout = np.asarray(Image.fromarray(self.layouts[label]).resize((width, height), Image.BICUBIC),
                            dtype=np.float32)
        texture = self.textures[rng.integers(self.TEXTURES)]
        top, left = rng.integers(self.TEXTURE_SIDE - height + 1), rng.integers(self.TEXTURE_SIDE - width + 1)
        image = 0.6 * layout + 0.4 * 128 + 40 * texture[top:top + height, left:left + width]
        return np.clip(image, 0, 255).astype(np.uint8)


def write_synthetic_shards(out_dir: str, num_classes: int = 10, train_samples: int = 5000,
                           val_samples: int = 1000, image_size: int = 32, samples_per_shard: int = 500,
                           difficulty: float = 0.5, seed: int = 0, progress: bool = True,
                           photo_like: bool = False) -> dict:
    """Write ``train-NNNNNN.tar`` and ``val-NNNNNN.tar`` shards and ``index.json``.

    ``photo_like``: ImageNet-size images (:class:`PhotoLikeImages`; ``image_size`` unused)
    instead of ``image_size`` squares. The index records each shard's sample count, byte
    size and sha256 (the same ``records`` as ``shards from-folder``), so ``shards verify``
    can tell a damaged or truncated shard from a sound one.
    """
    import webdataset as wds
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    photo = PhotoLikeImages(num_classes, rng) if photo_like else None
    layouts = _layouts(rng, num_classes, 4, image_size)
    distractors = _layouts(rng, 64, 4, image_size)
    index = {"num_classes": num_classes, "image_size": "about 500x375" if photo_like else image_size,
             "generator": "kdscale synth (photo-like)" if photo_like else "kdscale synth", "seed": seed, "splits": {}}
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
                    pixels = photo(label, split_rng) if photo else \
                        synth_image(layouts[label], split_rng, distractors, difficulty)
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
