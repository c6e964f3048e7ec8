"""DeiT (distillation token): the terms against an independent reference
(``tests/helpers/reference_deit.py``) for hard and soft distillation, both normalisations
and the alpha weighting; gradient routing head by head; evaluation by the mean of the two
heads; the refusal of a student without a distillation token; and a short real run."""

from __future__ import annotations

import json
import os

import pytest
import timm
import torch
from helpers import reference_deit as ref
from helpers.common import make_config
from helpers.methods import TINY_DEIT, has_grad_from, no_grad_from
from helpers.methods import tiny_distilled_vit as tiny_vit
from torch import nn

from kdscale.errors import KdscaleError
from kdscale.methods import MethodContext, TeacherOutput, get_method_class
from kdscale.methods.deit import deit_hard_distillation, deit_soft_distillation
from kdscale.models import build_model

NUM_CLASSES = 10
REL = 1e-5


def approx(value):
    return pytest.approx(value, rel=REL, abs=1e-7)


def tiny_distilled_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return tiny_vit(NUM_CLASSES)


def build(student: nn.Module | None = None, student_name: str = "timm:deit_tiny_distilled_patch16_224", **params):
    cls = get_method_class("deit")
    context = MethodContext(num_classes=NUM_CLASSES, image_size=32, method_name="deit", student_name=student_name,
                            teacher_role="frozen")
    return cls(student if student is not None else tiny_distilled_vit(), cls.Params(**params), context).train()


def data(batch: int = 6, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=gen)
    targets = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    teacher = torch.randn(batch, NUM_CLASSES, generator=gen) * 3
    return images, targets, teacher


def heads(student: nn.Module, images: torch.Tensor):
    """The two heads as timm gives them in distilled training."""
    student.set_distilled_training(True)
    try:
        return student(images)
    finally:
        student.set_distilled_training(False)


def test_loss_functions_against_reference_on_random_tensors():
    gen = torch.Generator().manual_seed(7)
    student, teacher = torch.randn(5, 13, generator=gen) * 2, torch.randn(5, 13, generator=gen) * 2
    for tau in (1.0, 3.0):
        numel = deit_soft_distillation(student, teacher, tau, "numel").item()
        batch = deit_soft_distillation(student, teacher, tau, "batch").item()
        assert numel == approx(ref.soft_distillation(student, teacher, tau, "numel"))
        assert batch == approx(ref.soft_distillation(student, teacher, tau, "batch"))
        assert batch == approx(13 * numel)  # the code's numel form is the batch mean over the classes
    assert deit_hard_distillation(student, teacher).item() == approx(ref.hard_distillation(student, teacher))


@pytest.mark.parametrize("params", [
    {},  # the defaults: hard, alpha 0.5
    {"distillation": "hard", "alpha": 0.2},
    {"distillation": "soft", "alpha": 0.7, "tau": 3.0},
    {"distillation": "soft", "alpha": 0.7, "tau": 3.0, "soft_normalization": "batch"},
    {"distillation": "soft", "alpha": 0.0},
    {"distillation": "hard", "alpha": 1.0},
], ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()) or "default")
def test_deit_terms_match_reference(params):
    method = build(**params)
    images, targets, teacher = data()
    logits, losses = method(images, targets, TeacherOutput(logits=teacher))
    assert set(losses) == {"ce", "dist"}
    class_logits, dist_logits = heads(method.student, images)
    full = {"distillation": "hard", "alpha": 0.5, "tau": 1.0, "soft_normalization": "numel", **params}
    expected = ref.deit_terms(class_logits.detach(), dist_logits.detach(), teacher, targets, full["distillation"],
                              full["alpha"], full["tau"], full["soft_normalization"])
    assert losses["ce"].item() == approx(expected["ce"])
    assert losses["dist"].item() == approx(expected["dist"])
    assert torch.allclose(logits, (class_logits + dist_logits) / 2, atol=1e-6)
    assert not method.student.distilled_training  # switched on for the call only


def test_defaults_are_the_papers_hard_distillation():
    p = get_method_class("deit").Params()
    assert (p.distillation, p.alpha, p.tau, p.soft_normalization) == ("hard", 0.5, 1.0, "numel")


def test_soft_targets_and_label_smoothing_reach_the_class_head_only():
    method = build(distillation="hard", alpha=0.4)
    method.label_smoothing = 0.1
    images, targets, teacher = data()
    mixed = torch.softmax(torch.randn(len(targets), NUM_CLASSES, generator=torch.Generator().manual_seed(5)), 1)
    _, losses = method(images, mixed, TeacherOutput(logits=teacher))
    class_logits, dist_logits = heads(method.student, images)
    assert losses["ce"].item() == approx(0.6 * ref.cross_entropy(class_logits.detach(), mixed, 0.1))
    # The hard branch takes the teacher's argmax as it is, without the run's label smoothing.
    assert losses["dist"].item() == approx(0.4 * ref.hard_distillation(dist_logits.detach(), teacher))


@pytest.mark.parametrize("distillation", ["hard", "soft"])
def test_gradient_routing(distillation):
    method = build(distillation=distillation)
    images, targets, _ = data()
    teacher_net = nn.Linear(3 * 32 * 32, NUM_CLASSES)  # trainable on purpose: the method must detach it
    _, losses = method(images, targets, TeacherOutput(logits=teacher_net(images.flatten(1))))
    student = method.student
    assert has_grad_from(losses["ce"], student.head) and no_grad_from(losses["ce"], student.head_dist)
    assert has_grad_from(losses["dist"], student.head_dist) and no_grad_from(losses["dist"], student.head)
    assert has_grad_from(losses["ce"], student.blocks) and has_grad_from(losses["dist"], student.blocks)
    dist_token = torch.autograd.grad(losses["dist"], student.dist_token, retain_graph=True)[0]
    assert dist_token.abs().sum() > 0
    assert no_grad_from(losses["ce"] + losses["dist"], teacher_net)


def test_evaluation_scores_the_mean_of_the_heads_and_each_head():
    method = build().eval()
    images, _, teacher = data()
    with torch.no_grad():
        outputs = method.evaluation_logits(images, TeacherOutput(logits=teacher))
        stock = method.student(images)  # timm's own inference output: the mean of the heads
        tokens = method.student.forward_features(images)
    assert set(outputs) == {"student", "class_head", "dist_head"}
    assert torch.allclose(outputs["class_head"], method.student.head(tokens[:, 0]), atol=1e-6)
    assert torch.allclose(outputs["dist_head"], method.student.head_dist(tokens[:, 1]), atol=1e-6)
    assert torch.allclose(outputs["student"], (outputs["class_head"] + outputs["dist_head"]) / 2, atol=1e-6)
    assert torch.allclose(outputs["student"], stock, atol=1e-6)
    assert not torch.allclose(outputs["class_head"], outputs["dist_head"])


def test_a_student_without_distillation_token_is_refused_in_one_line():
    with pytest.raises(KdscaleError) as err:
        build(build_model("resnet8", NUM_CLASSES), student_name="resnet8")
    message = str(err.value)
    assert "\n" not in message
    assert "student.name=resnet8" in message and "deit_small_distilled_patch16_224" in message
    plain_vit = timm.create_model("deit_tiny_patch16_224", num_classes=NUM_CLASSES, **TINY_DEIT)
    with pytest.raises(KdscaleError, match="timm:deit_tiny_patch16_224 has none"):
        build(plain_vit, student_name="timm:deit_tiny_patch16_224")


def test_short_run_logs_both_terms_and_scores_both_heads(synth_data, tmp_path, monkeypatch):
    from kdscale.train.loop import Trainer

    create = timm.create_model

    def tiny(name, *args, **kwargs):  # the stock DeiT-Tiny is 224 px and 5M parameters: shrink it
        return create(name, *args, **{**kwargs, **TINY_DEIT}) if "distilled" in name else create(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", tiny)
    cfg = make_config(synth_data, str(tmp_path), "method.name=deit",
                      "student.name=timm:deit_tiny_distilled_patch16_224",
                      "teacher.name=resnet8", "data.train_samples=128", "train.epochs=1", "train.log_every_steps=1",
                      "optim.name=adamw", "optim.lr=5e-4", "optim.weight_decay=0.05", name="deit")
    with pytest.warns(UserWarning, match="randomly initialised teacher"):
        summary = Trainer(cfg).train()
    assert summary["completed"]
    metrics = summary["metrics"]
    assert {"val/student_top1", "val/class_head_top1", "val/dist_head_top1", "val/teacher_top1"} <= set(metrics)
    logged = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    train = [entry for entry in logged if "train/loss_dist" in entry]
    assert train and all("train/loss_ce" in entry for entry in train)
    assert all(torch.isfinite(torch.tensor([e["train/loss_ce"], e["train/loss_dist"]])).all() for e in train)
