"""``kdscale plan`` on networks that accept only their own input size (a timm ViT: DeiT's
student asserts 224 px): activations are probed at ``data.image_size`` itself, the per-sample
cost from the two probe batches, instead of at the small probe side scaled by area. A config
of networks of any input size is probed as before."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers.common import ROOT
from torch import nn

from kdscale.cli import main
from kdscale.config import load_config
from kdscale.errors import KdscaleError
from kdscale.planning.activations import PROBE_BATCHES, PROBE_SIDE
from kdscale.planning.memory import plan_networks

DEIT = f"{ROOT}/configs/deit_imagenet.yaml"


def test_deit_config_plans_at_its_input_size(capsys):
    # The shipped config's weights point at a hub tag and files that are not here: random weights, same sizes.
    main(["plan", "--config", DEIT, "--gpus", "8", "student.weights=null", "teacher.weights=null"])
    out = capsys.readouterr().out
    assert "method deit: trained 22.44 M parameters" in out and "timm:regnety_160" in out, out
    assert f"(measured on CPU at batches {PROBE_BATCHES[0]} and {PROBE_BATCHES[1]} x 224px)" in out, out
    assert "fits in 80 GiB: ddp/replicated" in out, out


class FixedSide(nn.Module):
    """Accepts only ``side`` px (a flattened map into a Linear), with no attribute that says so."""

    def __init__(self, side: int, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.fc = nn.Linear(4 * ((side + 3) // 4) ** 2, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def tiny_vit(side: int, classes: int = 10) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=side, depth=1, num_classes=classes)


def any_size(classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))


def plan(student: nn.Module, teacher: nn.Module, side: int):
    from kdscale.methods import MethodContext, get_method_class
    from kdscale.teachers.frozen import FrozenTeacher

    cfg = load_config(None, ["data.batch_size=16", "train.precision=fp32", f"data.image_size={side}",
                             "data.num_classes=10"])
    torch.manual_seed(0)
    cls = get_method_class("kd")
    context = MethodContext(num_classes=10, image_size=side, method_name="kd", teacher_network=teacher,
                            teacher_role="frozen", teacher_name="t", teacher_pretrained=True)
    distiller = cls(student, cls.Params(), context).train()
    return plan_networks(distiller, FrozenTeacher(teacher, [], torch.device("cpu"), None, False), cfg, 2)


@pytest.mark.parametrize("fixed", ["student", "teacher"])
def test_fixed_size_network_is_probed_at_image_size(fixed):
    side = PROBE_SIDE + 32  # larger than the probe side: networks of any size would be probed at PROBE_SIDE
    student, teacher = (tiny_vit(side), any_size()) if fixed == "student" else (any_size(), tiny_vit(side))
    result = plan(student, teacher, side)
    assert result.activation.probe_side == side
    assert result.activation.per_sample > 0
    assert result.rows[0].activations == result.activation.at(16, side)


def test_network_without_a_size_attribute_is_probed_at_image_size_after_failing():
    side = PROBE_SIDE + 32
    assert plan(FixedSide(side), any_size(), side).activation.probe_side == side


def test_networks_of_any_size_are_probed_at_the_small_side_as_before():
    side = PROBE_SIDE + 32
    estimate = plan(any_size(), any_size(), side).activation
    assert estimate.probe_side == PROBE_SIDE
    assert estimate.at(16, side) == int(estimate.constant + estimate.per_sample * 16 * (side / PROBE_SIDE) ** 2)


def test_fixed_size_other_than_image_size_is_one_clear_error():
    with pytest.raises(KdscaleError, match=r"data.image_size is 96 but teacher teacher.patch_embed accepts only "
                                           r"64x64 px inputs: set data.image_size=64"):
        plan(any_size(), tiny_vit(64), 96)
