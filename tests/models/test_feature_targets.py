"""Summary and spatial features of any network (kdscale/models/feature_targets.py): two timm
ViTs with different token grids and widths (one built at another input size), a timm CNN, a
CIFAR ResNet and torchvision classifiers; each target against the same tensor computed here
step by step from the network's modules, shapes from a dry forward, and errors naming the
network when a target has no layer."""

from __future__ import annotations

import pytest
import timm
import torch

from kdscale.errors import KdscaleError
from kdscale.models import build_model
from kdscale.models.feature_targets import FeatureTargets


def vit(name: str, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kwargs).eval()


@pytest.mark.parametrize("name, size, kwargs, grid, width", [
    ("test_vit3", 160, {}, 10, 96),            # CLS + attention-pool head, 16 px patches
    ("test_vit", 96, {"img_size": 96}, 6, 64),  # built at another input size: a 6x6 grid
])
def test_vit_targets_are_its_patch_grid_and_pre_logits(name, size, kwargs, grid, width):
    model = vit(name, **kwargs)
    targets = FeatureTargets(model, ["summary", "spatial"], "teachers[0]", logits=True)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits, out = targets(images)
        tokens = model.forward_features(images)  # by hand: drop the prefix, lay the patches row by row
        expected_spatial = torch.stack([tokens[:, model.num_prefix_tokens + r * grid + c] for r in range(grid)
                                        for c in range(grid)], dim=2).reshape(2, width, grid, grid)
        expected_summary = model.forward_head(tokens, pre_logits=True)
        expected_logits = model(images)
    assert out["spatial"].shape == (2, width, grid, grid) and out["summary"].shape == (2, width)
    assert torch.equal(out["spatial"], expected_spatial)
    assert torch.equal(out["summary"], expected_summary)
    torch.testing.assert_close(logits, expected_logits)
    assert targets.shapes((size, size)) == {"summary": (width,), "spatial": (width, grid, grid)}


def test_cnn_targets_are_the_last_map_and_the_pooled_vector():
    model = build_model("resnet8", 10).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        _, out = FeatureTargets(model, ["summary", "spatial"], "teacher")(images)
        x = model.relu(model.bn1(model.conv1(images)))
        last = model.layer3(model.layer2(model.layer1(x)))  # by hand, module by module
    assert torch.equal(out["spatial"], last)
    torch.testing.assert_close(out["summary"], last.mean(dim=(2, 3)))
    torch.manual_seed(0)
    timm_cnn = timm.create_model("test_resnet", num_classes=10).eval()
    with torch.no_grad():
        _, out = FeatureTargets(timm_cnn, ["spatial", "summary"], "teacher")(torch.randn(2, 3, 64, 64))
    assert out["spatial"].dim() == 4 and out["summary"].shape == (2, out["spatial"].shape[1])


def test_only_the_asked_targets_and_gradients_for_a_trained_network():
    model = build_model("torchvision:resnet18", 10)
    logits, out = FeatureTargets(model, ["summary"], "student")(torch.randn(2, 3, 64, 64))
    assert logits is None and set(out) == {"summary"} and out["summary"].shape == (2, 512)
    out["summary"].sum().backward()
    assert model.layer1[0].conv1.weight.grad is not None  # the graph is kept


def test_a_missing_target_layer_is_one_line_naming_the_network():
    model = build_model("torchvision:mobilenet_v2", 10)  # pools in a function: no avgpool module
    with pytest.raises(KdscaleError, match=r"^teachers\[1\]: MobileNetV2 has no module named avgpool to take its "
                                           r"spatial features from; set teachers\[1\]\.spatial_layer to the module "
                                           r"whose output is the map \(e\.g\. features\)$"):
        FeatureTargets(model, ["spatial"], "teachers[1]")
    with pytest.raises(KdscaleError, match=r"teachers\[1\]: MobileNetV2 has no module 'head'"):
        FeatureTargets(model, ["summary"], "teachers[1]", summary_layer="head")
    with pytest.raises(KdscaleError, match=r"teachers\[1\]\.targets: \['logits'\] is not a list of summary, spatial"):
        FeatureTargets(model, ["logits"], "teachers[1]")
    # Named explicitly: the map is the output of `features`; the summary is the classifier's input.
    targets = FeatureTargets(model, ["summary", "spatial"], "teachers[1]", spatial_layer="features")
    assert targets.shapes((64, 64)) == {"summary": (1280,), "spatial": (1280, 2, 2)}
    model.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, out = targets(images)
        assert torch.equal(out["spatial"], model.features(images))
        torch.testing.assert_close(out["summary"], model.features(images).mean(dim=(2, 3)))
