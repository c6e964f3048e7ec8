"""``kdscale plan`` for method ``features`` (AM-RADIO): the adaptor heads are trained parameters
(in the plan's trained count, and listed per teacher), and each feature teacher's targets as
``kdscale.teach`` would store them (fp16: 2D bytes of summary and 2CHW of spatial map per
crop, times ``crops_per_image``, times the training samples), checked against numbers worked
out by hand here for two random timm ViTs of other widths and grids and a CIFAR CNN."""

from __future__ import annotations

import pytest
import yaml
from helpers.common import ROOT

from kdscale.config import load_config
from kdscale.config.schema import TeacherSpec
from kdscale.models import build_model
from kdscale.planning.features import FeaturePlan, TeacherTargets, features_text
from kdscale.planning.memory import plan_config
from kdscale.planning.networks import without_weights
from kdscale.planning.report import format_plan

BASE = f"{ROOT}/configs/kd_cifar100.yaml"  # resnet8x4 student, 32 px, 50000 training samples
TEACHERS = [
    # test_vit: 64 wide; 64 px in 8 px patches: an 8x8 grid
    {"id": "vit64", "name": "timm:test_vit", "timm_options": {"img_size": 64, "patch_size": 8}, "input_size": 64,
     "targets": ["summary", "spatial"]},
    # test_vit3: 96 wide; 48 px in 8 px patches: a 6x6 grid; 4 crops stored per image
    {"id": "vit96", "name": "timm:test_vit3", "timm_options": {"img_size": 48, "patch_size": 8}, "input_size": 48,
     "targets": ["summary", "spatial"], "crops_per_image": 4},
    # resnet32x4 at the student's 32 px: its pooled 256-d feature, its last 256 x 8 x 8 map
    {"id": "cnn", "name": "resnet32x4", "targets": ["summary", "spatial"]},
]
SHAPES = {"vit64": {"summary": (64,), "spatial": (64, 8, 8)}, "vit96": {"summary": (96,), "spatial": (96, 6, 6)},
          "cnn": {"summary": (256,), "spatial": (256, 8, 8)}}
# fp16 bytes per crop: 2 * (D + C * H * W)
PER_CROP = {"vit64": 2 * 64 + 2 * 64 * 8 * 8,  # 128 + 8192 = 8320
            "vit96": 2 * 96 + 2 * 96 * 6 * 6,  # 192 + 6912 = 7104
            "cnn": 2 * 256 + 2 * 256 * 8 * 8}  # 512 + 32768 = 33280
CROPS = {"vit64": 10, "vit96": 4, "cnn": 10}
SAMPLES = 50000


def adaptor(student_width: int, width: int) -> int:
    """RADIO's MLP2 from the student's 256 features to the teacher's width D (hidden D):
    Linear(256, D) + LayerNorm(D) + Linear(D, D), weights and biases."""
    return student_width * width + width + 2 * width + width * width + width


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    raw = yaml.safe_load(open(BASE))
    del raw["teacher"]
    raw["teachers"] = TEACHERS
    raw["method"] = {"name": "features"}
    raw["data"]["labels"] = "none"
    path = tmp_path_factory.mktemp("plan-features") / "features.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(str(path))
    return cfg, plan_config(cfg, 2)


def test_feature_target_shapes_and_stored_bytes(planned):
    cfg, plan = planned
    features = plan.features
    assert [t.id for t in features.teachers] == ["vit64", "vit96", "cnn"]
    assert features.samples == SAMPLES
    for teacher in features.teachers:
        assert teacher.shapes == SHAPES[teacher.id]
        assert teacher.bytes_per_crop() == PER_CROP[teacher.id]
        assert teacher.bytes_per_crop("summary") == 2 * SHAPES[teacher.id]["summary"][0]
        assert teacher.crops_per_image == CROPS[teacher.id]
        assert teacher.bytes_per_image == PER_CROP[teacher.id] * CROPS[teacher.id]
        assert features.dataset_bytes(teacher) == PER_CROP[teacher.id] * CROPS[teacher.id] * SAMPLES
    assert features.dataset_bytes(features.teachers[0]) == 4_160_000_000  # 8320 B x 10 crops x 50000


def test_adaptor_heads_are_trained_parameters(planned):
    cfg, plan = planned
    features = plan.features
    heads = {t.id: t.adaptor_parameters for t in features.teachers}
    assert heads == {"vit64": {"summary": adaptor(256, 64), "spatial": adaptor(256, 64)},
                     "vit96": {"summary": adaptor(256, 96), "spatial": adaptor(256, 96)},
                     "cnn": {"summary": adaptor(256, 256), "spatial": adaptor(256, 256)}}
    assert adaptor(256, 64) == 20_736 and adaptor(256, 96) == 34_176 and adaptor(256, 256) == 132_096
    whole = build_model("resnet8x4", 100)
    # the classifier no term reaches (no ce, no kd) is frozen: not trained
    student = sum(p.numel() for p in whole.parameters()) - sum(p.numel() for p in whole.fc.parameters())
    assert features.student == student
    # The plan's trained Ψ (gradients, optimizer state, communication) is the student and every head.
    assert plan.sizes.trained == student + 2 * (20_736 + 34_176 + 132_096)
    assert features.adaptors == 2 * (20_736 + 34_176 + 132_096)
    ddp = next(r for r in plan.rows if r.strategy == "ddp" and r.teacher_sharding == "replicated")
    assert ddp.gradients == 4 * plan.sizes.trained


def test_report_lists_heads_and_stored_targets(planned):
    cfg, plan = planned
    out = format_plan(plan, cfg, "features.yaml")
    assert (f"adaptor heads (trained, in the count above): student {plan.features.student / 1e6:.2f} M + adaptor "
            f"heads 0.37 M parameters; vit64: summary 0.021 M + spatial 0.021 M, vit96: summary 0.034 M + spatial "
            f"0.034 M, cnn: summary 0.132 M + spatial 0.132 M") in out, out
    assert ("stored feature targets (kdscale.teach, fp16) of vit64 (timm:test_vit): summary 64 (128 B) + spatial "
            "64x8x8 (8192 B) = 8320 B per crop x 10 crops = 83200 B (81.25 KiB) per sample; x 50000 training samples "
            "= 3.87 GiB (4160000000 B)") in out, out
    assert "of vit96 (timm:test_vit3): summary 96 (192 B) + spatial 96x6x6 (6912 B) = 7104 B per crop x 4 crops" in out
    assert "= 33280 B per crop x 10 crops = 332800 B (325.00 KiB) per sample; x 50000 training samples" in out


def test_without_a_sample_count_the_report_says_what_to_set():
    teacher = TeacherTargets("t", "x", {"summary": (8,)}, {"summary": 100}, 3)
    text = features_text(FeaturePlan([teacher], 1000, None))
    assert "summary 8 (16 B) = 16 B per crop x 3 crops = 48 B (48 B) per sample; whole dataset: set " \
           "data.train_samples" in text
    assert features_text(None) == ""


def test_planned_teacher_keeps_its_weights_input_size():
    """Random weights in the plan, but the input its hub weights give: DINOv2's 518 px and
    its mean and std, so the adaptor heads and targets are sized as in the run."""
    spec = TeacherSpec(name="timm:vit_large_patch14_dinov2.lvd142m", weights="timm:DEFAULT", sharding="zero3")
    planned = without_weights(load_config(None, ["data.image_size=224"]), spec, "teacher")
    assert (planned.weights, planned.sharding, planned.input_size) == (None, "replicated", 518)
    assert planned.mean == [0.485, 0.456, 0.406] and planned.std == [0.229, 0.224, 0.225]
    own = without_weights(load_config(None, []), TeacherSpec(name="resnet20", weights="t.pt", input_size=40), "teacher")
    assert (own.weights, own.input_size, own.mean) == (None, 40, None)  # a file carries no preprocessing
