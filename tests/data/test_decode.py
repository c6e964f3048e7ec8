"""Decode paths: JPEG draft mode (DCT-domain downscaling) takes the same crop boxes and
flips as a full decode for the same seeds, changes pixels only within the tolerance that
docs/data.md states, and the photo-like synthetic set has ImageNet's sizes."""

from __future__ import annotations

import random
import statistics

import pytest
import torch

from kdscale.config.schema import DataSection
from kdscale.data.transforms import SampleDecoder, random_resized_crop_box


def test_photo_like_set_has_imagenet_sizes(photo_samples):
    import io

    from PIL import Image

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
    import io

    from PIL import Image

    return Image.open(io.BytesIO(jpeg)).size


def test_draft_mode_is_exact_when_the_crop_is_small(photo_samples):
    """Crops under twice the output size are decoded at full scale: identical pixels."""
    size = 400
    draft = SampleDecoder(DataSection(augment="imagenet", image_size=size, jpeg_draft=True), True)
    full = SampleDecoder(DataSection(augment="imagenet", image_size=size, jpeg_draft=False), True)
    for i, sample in enumerate(photo_samples[:8]):
        assert torch.equal(draft(sample["jpg"], random.Random(i)), full(sample["jpg"], random.Random(i)))


def test_device_decode_takes_the_cpu_paths_boxes_and_flips(photo_samples):
    from kdscale.data.device_decode import (
        DeferredDecoder,
        decode_on_device,
        stack_views,
    )

    section = DataSection(augment="imagenet", image_size=96, jpeg_draft=False)
    cpu, deferred = SampleDecoder(section, True), DeferredDecoder(section)
    encoded, expected = [], []
    for i, sample in enumerate(photo_samples[:16]):
        rng_cpu, rng_device = random.Random(i), random.Random(i)
        expected.append(cpu(sample["jpg"], rng_cpu))
        encoded.append(deferred(sample["jpg"], rng_device))
        assert rng_cpu.getstate() == rng_device.getstate()  # the same draws: box and flip
        assert encoded[-1].box == random_resized_crop_box(*_size(sample["jpg"]), random.Random(i))
    views, undecodable = decode_on_device(stack_views(encoded), section, torch.device("cpu"))
    assert undecodable == [] and views.shape == (16, 3, 96, 96)
    levels = torch.tensor(section.std).view(3, 1, 1) * 255
    per_image = [((a - b) * levels).abs().mean().item() for a, b in zip(views, torch.stack(expected))]
    assert max(per_image) < 2, per_image  # Pillow's and torch's resampling: documented in device_decode


def test_device_decode_replaces_an_undecodable_image(photo_samples):
    from kdscale.data.device_decode import (
        DeferredDecoder,
        decode_on_device,
        stack_views,
    )

    section = DataSection(augment="imagenet", image_size=32)
    deferred = DeferredDecoder(section)
    encoded = [deferred(s["jpg"], random.Random(i)) for i, s in enumerate(photo_samples[:4])]
    broken = encoded[1].data.clone()
    broken[len(broken) // 3:] = 0  # a JPEG whose scan data is gone
    encoded[1] = encoded[1]._replace(data=broken)
    views, undecodable = decode_on_device(stack_views(encoded), section, torch.device("cpu"))
    assert undecodable == [1]
    good, _ = decode_on_device(stack_views([encoded[2]]), section, torch.device("cpu"))
    assert torch.equal(views[1], good[0])  # the next decodable image of the batch, with its box


@pytest.mark.slow  # a real training run: the full tier
def test_training_with_device_decode(photo_samples, tmp_path):
    import os

    from kdscale.config import load_config
    from kdscale.train.loop import Trainer

    shards = os.path.dirname(photo_samples[0]["__url__"])
    common = [f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar", "data.num_classes=4",
              "data.image_size=32", "data.augment=imagenet", "data.batch_size=8", "data.num_workers=1",
              "student.name=resnet8", "train.epochs=1", "wandb.mode=disabled", f"experiment.output_dir={tmp_path}"]
    trainer = Trainer(load_config(None, common + ["data.decode=gpu", "experiment.name=gpu-decode"]))
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    assert summary["completed"] and summary["step"] == 48 // 8
    with pytest.raises(Exception, match="data.decode=gpu decodes random-resized crops"):
        Trainer(load_config(None, common + ["data.decode=gpu", "data.augment=cifar", "experiment.name=bad"]))
