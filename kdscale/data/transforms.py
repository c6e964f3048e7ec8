"""Decoding and augmentation driven by an explicit per-sample random generator.

Every random choice (crop box, flip) comes from a ``random.Random`` seeded from the
run seed, the epoch and the sample's position in the stream, never from global RNG
state. A resumed run that skips the batches it already trained on therefore draws the
same augmentations as a run that never stopped, and a crop can be recorded and replayed.
"""

from __future__ import annotations

import io
import math
import random

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from kdscale.config.schema import DataSection


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height) as in Szegedy et al. 2015's Inception crop:
    area fraction uniform in ``scale``, log-uniform aspect ratio, 10 tries, then the
    largest centred crop within the ratio bounds."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _rgb(image: Image.Image) -> Image.Image:
    """The image decoded as RGB; no copy when it already is."""
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


class SampleDecoder:
    """JPEG bytes -> normalised float tensor (C, H, W), augmented for training."""

    def __init__(self, data: DataSection, train: bool):
        self.size = data.image_size
        self.augment = data.augment if train else "none"
        self.train = train
        default_resize = self.size if data.augment == "cifar" else int(round(self.size * 8 / 7))
        self.val_resize = data.val_resize or default_resize
        self.mean, self.std = list(data.mean), list(data.std)
        self.jpeg_draft = data.jpeg_draft
        # (x / 255 - mean) / std as one multiply and one subtract, in place on a fresh float copy
        std = torch.tensor(self.std).view(3, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std), torch.tensor(self.mean).view(3, 1, 1) / std

    def __call__(self, jpeg: bytes, rng: random.Random | None) -> torch.Tensor:
        image = Image.open(io.BytesIO(jpeg))  # reads the header; pixels are decoded on first use
        if self.augment == "imagenet":
            box = random_resized_crop_box(image.width, image.height, rng)
            image, box = self._draft(image, box) if self.jpeg_draft else (image, box)
            left, top, w, h = box
            image = _rgb(image).resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
            tensor = TF.pil_to_tensor(image)
            if rng.random() < 0.5:
                tensor = tensor.flip(-1)
            return self.normalize(tensor)
        image = _rgb(image)
        if self.augment == "cifar":
            tensor = TF.pil_to_tensor(self._resize_exact(image))
            padded = torch.nn.functional.pad(tensor, (4, 4, 4, 4))
            top, left = rng.randint(0, 8), rng.randint(0, 8)
            tensor = padded[:, top:top + self.size, left:left + self.size]
        else:
            tensor = TF.pil_to_tensor(self._resize_center_crop(image))
        if self.augment != "none" and rng.random() < 0.5:
            tensor = tensor.flip(-1)
        return self.normalize(tensor)

    def normalize(self, tensor: torch.Tensor) -> torch.Tensor:
        """uint8 (C, H, W) -> normalised float."""
        return tensor.float().mul_(self.scale).sub_(self.shift)

    def _draft(self, image: Image.Image, box: tuple[int, int, int, int]):
        """Decode a JPEG at the smallest DCT scale (1, 1/2, 1/4, 1/8) that keeps the crop at
        least ``size`` pixels on its shorter side; the box follows the scale."""
        reduction = min(box[2], box[3]) / self.size
        if image.format != "JPEG" or reduction < 2:
            return image, box
        width, height = image.size
        image.draft("RGB", (math.ceil(width / reduction), math.ceil(height / reduction)))
        fx, fy = image.width / width, image.height / height
        return image, (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)

    def _resize_exact(self, image: Image.Image) -> Image.Image:
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR)
        return image

    def _resize_center_crop(self, image: Image.Image) -> Image.Image:
        if image.size == (self.size, self.size):
            return image
        scale = self.val_resize / min(image.size)
        resized = image.resize((max(self.size, round(image.width * scale)),
                                max(self.size, round(image.height * scale))), Image.BILINEAR)
        left = (resized.width - self.size) // 2
        top = (resized.height - self.size) // 2
        return resized.crop((left, top, left + self.size, top + self.size))
