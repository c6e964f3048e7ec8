"""Mixup and CutMix: what they do to images and targets, determinism, and training runs."""

from __future__ import annotations

import pytest
import torch
from helpers.common import make_config

from kdscale.config.schema import DataSection
from kdscale.data.mixing import mix_batch
from kdscale.train.loop import Trainer


def batch():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(6, 3, 8, 8, generator=gen), torch.tensor([0, 1, 2, 3, 4, 5])


def test_mixup_is_a_convex_pair_combination():
    images, targets = batch()
    data = DataSection(num_classes=6, mixup_alpha=0.4)
    mixed, soft, _ = mix_batch(images, targets, data, torch.Generator().manual_seed(3))
    assert torch.allclose(soft.sum(1), torch.ones(6))
    lam = soft.max(1).values.min().item()  # each row: lam on its label, 1 - lam on the partner's
    again, soft2, _ = mix_batch(images, targets, data, torch.Generator().manual_seed(3))
    assert torch.equal(mixed, again) and torch.equal(soft, soft2)  # reproducible from the seed
    for i in range(6):  # the row's label weights say whom it was mixed with, and how much
        own = soft[i, i].item()
        partner = [j for j in range(6) if j != i and soft[i, j] > 0]
        expected = images[i] if not partner else own * images[i] + (1 - own) * images[partner[0]]
        assert torch.allclose(mixed[i], expected, atol=1e-5)
    assert 0.0 <= lam <= 1.0


def test_cutmix_pastes_a_box_with_matching_label_weight():
    images, targets = batch()
    data = DataSection(num_classes=6, cutmix_alpha=1.0)
    probs = torch.softmax(torch.randn(6, 6), 1)
    mixed, soft, mixed_probs = mix_batch(images, targets, data, torch.Generator().manual_seed(5), probs)
    changed = (mixed != images).any(dim=1)  # (B, H, W) pixels taken from the partner
    for i in range(6):
        fraction = changed[i].float().mean().item()
        own = soft[i, targets[i]].item()
        if fraction > 0:
            assert own == pytest.approx(1 - fraction, abs=1e-6)
    assert torch.allclose(mixed_probs.sum(1), torch.ones(6))


def test_training_with_mixup_and_cutmix(synth_data, tmp_path):
    for method, extra in (("kd", ["teacher.name=resnet8"]), ("ffcl", ["teacher.name=resnet8"])):
        cfg = make_config(synth_data, str(tmp_path), f"method.name={method}", "student.name=resnet8", *extra,
                          "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0", "data.train_samples=256", name=method)
        summary = Trainer(cfg).train()
        assert summary["completed"]
