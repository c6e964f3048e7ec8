"""Tests for the CIFAR teacher/student networks in kdscale.models.cifar."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdscale.models.cifar import CIFAR_MODELS

# Reference parameter counts (millions, num_classes=100) from the CRD /
# RepDistiller CIFAR-100 benchmark.
REFERENCE_PARAMS_M = {
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "wrn_40_2": 2.26,
}

# Expected channel counts of the three stage outputs.
STAGE_CHANNELS = {
    "resnet8": (16, 32, 64),
    "resnet20": (16, 32, 64),
    "resnet32": (16, 32, 64),
    "resnet56": (16, 32, 64),
    "resnet110": (16, 32, 64),
    "resnet8x4": (64, 128, 256),
    "resnet32x4": (64, 128, 256),
    "wrn_16_2": (32, 64, 128),
    "wrn_40_1": (16, 32, 64),
    "wrn_40_2": (32, 64, 128),
}

ALL_NAMES = sorted(CIFAR_MODELS)


def _stage_names(name: str) -> tuple[str, str, str]:
    if name.startswith("wrn"):
        return ("block1", "block2", "block3")
    return ("layer1", "layer2", "layer3")


def test_registry_has_expected_models() -> None:
    assert set(CIFAR_MODELS) == set(STAGE_CHANNELS)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_forward_shape_stages_and_backward(name: str) -> None:
    torch.manual_seed(0)
    model = CIFAR_MODELS[name](num_classes=10)
    model.train()

    feats: dict[str, torch.Tensor] = {}
    handles = []
    for stage in _stage_names(name):
        module = getattr(model, stage)
        assert isinstance(module, nn.Sequential)

        def hook(_m, _inp, out, stage=stage):
            feats[stage] = out

        handles.append(module.register_forward_hook(hook))

    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    for h in handles:
        h.remove()

    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()

    for stage, channels, size in zip(_stage_names(name), STAGE_CHANNELS[name], (32, 16, 8)):
        assert feats[stage].shape == (2, channels, size, size), stage

    logits.sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS_M))
def test_parameter_counts(name: str) -> None:
    model = CIFAR_MODELS[name](num_classes=100)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    ref = REFERENCE_PARAMS_M[name]
    assert abs(n_params - ref) / ref < 0.03, f"{name}: {n_params:.3f}M vs {ref}M"


@pytest.mark.parametrize("name", ["resnet20", "wrn_16_2"])
def test_default_num_classes_and_named_modules(name: str) -> None:
    model = CIFAR_MODELS[name]()
    assert model.fc.out_features == 100
    expected = ["conv1", "bn1", "relu", "avgpool", "fc", *_stage_names(name)]
    for attr in expected:
        assert hasattr(model, attr), attr
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
