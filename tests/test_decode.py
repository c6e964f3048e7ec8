"""Decode paths: JPEG draft mode (DCT-domain downscaling) takes the same crop boxes and
flips as a full decode for the same seeds, changes pixels only within the tolerance that
docs/data.md states, and the photo-like synthetic set has ImageNet's sizes."""

from __future__ import annotations

import glob
import random
import statistics

import pytest
import torch

from kdscale.config.schema import DataSection
from kdscale.data.loader import _samples_of
from kdscale.data.synth import write_synthetic_shards
from kdscale.data.transforms import SampleDecoder, random_resized_crop_box


@pytest.fixture(scope="module")
def photo_samples(tmp_path_factory):
    out = tmp_path_factory.mktemp("photo")
    write_synthetic_shards(str(out), num_classes=4, train_samples=48, val_samples=4, samples_per_shard=48,
                           photo_like=True, progress=False)
    return list(_samples_of(sorted(glob.glob(str(out / "train-*.tar")))))


def test_photo_like_set_has_imagenet_sizes(photo_samples):
    from PIL import Image
    import io

    sizes = [Image.open(io.BytesIO(s["jpg"])).size for s in photo_samples]
    kilobytes = [len(s["jpg"]) / 1024 for s in photo_samples]
    assert 300 < statistics.mean(max(w, h) for w, h in sizes) < 700
    assert len(set(sizes)) > 10 and any(h > w for w, h in sizes)  # varied, portraits too
    assert 70 < statistics.mean(kilobytes) < 160


@pytest.mark.parametrize("size", [64, 128, 224])
def test_draft_mode_same_crops_and_pixels_within_tolerance(photo_samples, size):
    draft = SampleDecoder(DataSection(augment="imagenet", image_size=size, jpeg_draft=True), True)
    full = SampleDecoder(DataSection(augment="imagenet", image_size=size, jpeg_draft=False), True)
    levels = torch.tensor(draft.std).view(3, 1, 1) * 255
    per_image, reduced = [], 0
    for i, sample in enumerate(photo_samples):
        rng_draft, rng_full = random.Random(i), random.Random(i)
        a, b = draft(sample["jpg"], rng_draft), full(sample["jpg"], rng_full)
        assert rng_draft.getstate() == rng_full.getstate()  # the same draws: the same box and flip
        difference = ((a - b) * levels).abs().mean().item()
        per_image.append(difference)
        box = random_resized_crop_box(*_size(sample["jpg"]), random.Random(i))
        reduced += min(box[2], box[3]) >= 2 * size
    assert max(per_image) < 10  # of 255 levels, documented in docs/data.md
    assert statistics.mean(per_image) < 4
    if reduced:  # the comparison can tell: where draft mode applies, the pixels are not identical
        assert max(per_image) > 0


def _size(jpeg: bytes) -> tuple[int, int]:
    from PIL import Image
    import io

    return Image.open(io.BytesIO(jpeg)).size


def test_draft_mode_is_exact_when_the_crop_is_small(photo_samples):
    """Crops under twice the output size are decoded at full scale: identical pixels."""
    size = 400
    draft = SampleDecoder(DataSection(augment="imagenet", image_size=size, jpeg_draft=True), True)
    full = SampleDecoder(DataSection(augment="imagenet", image_size=size, jpeg_draft=False), True)
    for i, sample in enumerate(photo_samples[:8]):
        assert torch.equal(draft(sample["jpg"], random.Random(i)), full(sample["jpg"], random.Random(i)))
