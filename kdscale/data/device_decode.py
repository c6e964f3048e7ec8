"""``data.decode: gpu``: JPEGs decoded and cropped on the training device, in batches.

The loader workers do only what needs no pixels: read the header, draw the crop box and
the flip with the sample's own generator (the same draws as the CPU path:
:class:`~kdscale.data.transforms.SampleDecoder`), and ship the encoded bytes. The rank
then decodes the whole batch with ``torchvision.io.decode_jpeg`` on its device (nvJPEG on a
GPU), crops, resizes (bilinear with antialiasing, as Pillow's resize), flips and normalises
there. Same boxes and flips as the CPU path for the same seeds; pixels differ by Pillow's
versus torch's resampling and rounding (under 2 of 255 levels in mean absolute value:
``tests/data/test_decode.py``).

An image the device cannot decode is replaced by the next decodable image of the batch
(with that image's box), as the CPU path replaces an undecodable one, and counted. On a
CPU-only run the same path runs with torchvision's CPU decoder (what the tests exercise).
Training with ``imagenet`` augmentation only; validation and teacher-output replay decode
on the CPU.
"""

from __future__ import annotations

import io
import random
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image

from kdscale.config.schema import DataSection
from kdscale.data.transforms import random_resized_crop_box


class EncodedImage(NamedTuple):
    data: torch.Tensor
    """The JPEG file, uint8."""
    box: tuple[int, int, int, int]
    """(left, top, width, height) in the full-size image."""
    flip: bool


class EncodedBatch(NamedTuple):
    data: list[torch.Tensor]
    boxes: torch.Tensor
    flips: torch.Tensor

    @property
    def shape(self) -> tuple[int]:
        return (len(self.data),)


class DeferredDecoder:
    """The loader-worker half: header, box and flip; no pixels."""

    def __init__(self, data: DataSection):
        self.size = data.image_size

    def __call__(self, jpeg: bytes, rng: random.Random) -> EncodedImage:
        image = Image.open(io.BytesIO(jpeg))
        if image.format != "JPEG":
            raise ValueError(f"data.decode=gpu decodes JPEG only, this image is {image.format}")
        box = random_resized_crop_box(image.width, image.height, rng)
        flip = rng.random() < 0.5
        return EncodedImage(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), box, flip)


def stack_views(views: list) -> torch.Tensor | EncodedBatch:
    """A batch of decoded views (one tensor), or of encoded ones (:class:`EncodedBatch`)."""
    if isinstance(views[0], EncodedImage):
        return EncodedBatch([v.data for v in views], torch.tensor([v.box for v in views]),
                            torch.tensor([v.flip for v in views]))
    return torch.stack(views)


def _decode_each(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":
        # pytorch/vision#9606: CUDA decode_jpeg writes its output from a stream of its own pool,
        # not ordered against the caller's stream, so its pixels could race the kernels still
        # queued from the previous step. Wait for those first (one sync per batch), and again
        # after, before the crops read the decoded images.
        torch.cuda.current_stream(device).synchronize()
    try:
        return _synchronized(decode_jpeg(data, mode=ImageReadMode.RGB, device=device), device)
    except RuntimeError:  # one bad file fails the batch call: find it
        decoded = []
        for encoded in data:
            try:
                decoded.append(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
        return _synchronized(decoded, device)


def _synchronized(images, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images


def decode_on_device(batch: EncodedBatch, data: DataSection, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """(normalised views (B, 3, S, S) on ``device``, indices of the undecodable images)."""
    images = _decode_each(batch.data, device)
    bad = [i for i, image in enumerate(images) if image is None]
    good = [i for i in range(len(images)) if images[i] is not None]
    if not good:
        raise RuntimeError("no image of the batch could be decoded on the device")
    size = data.image_size
    out = torch.empty(len(images), 3, size, size, device=device)
    for i in range(len(images)):
        j = i if images[i] is not None else next((k for k in good if k > i), good[0])
        left, top, width, height = batch.boxes[j].tolist()
        crop = images[j][:, top:top + height, left:left + width].unsqueeze(0).float()
        view = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        out[i] = (view.flip(-1) if batch.flips[j] else view).round_().clamp_(0, 255)  # as Pillow's uint8
    std = torch.tensor(data.std, device=device).view(1, 3, 1, 1)
    mean = torch.tensor(data.mean, device=device).view(1, 3, 1, 1)
    return out.div_(255).sub_(mean).div_(std), bad
