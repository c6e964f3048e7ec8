"""Gradient routing: frozen teachers get no gradient, and every stop-gradient of the
method notes holds (checked with autograd on each loss term)."""

from __future__ import annotations

import pytest
from helpers.methods import batch, build_method, has_grad_from, no_grad_from


@pytest.mark.parametrize("name, teacher", [("kd", "resnet20"), ("at", "resnet20"), ("ctkd", "resnet20"),
                                           ("sokd", "wrn_16_2")])
def test_frozen_teacher_gets_no_gradient(name, teacher):
    method, frozen = build_method(name, "resnet8", teacher)
    images, targets = batch()
    _, losses = method(images, targets, frozen(images))
    sum(losses.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in frozen.model.parameters())
    assert not any(p is q for p in frozen.model.parameters() for q in method.parameters())
    assert any(p.grad is not None for p in method.student.parameters())


def test_sokd_stop_gradients():
    method, frozen = build_method("sokd", "resnet8", "wrn_16_2")
    images, targets = batch()
    _, losses = method(images, targets, frozen(images))
    student_loss = losses["ce"] + losses["kd"]
    kbm_loss = losses["kbm_ce"] + losses["kbm_kd_teacher"] + losses["kbm_kd_student"]
    assert no_grad_from(student_loss, method.kbm)  # the student's loss never trains the bridge
    assert has_grad_from(losses["kd"], method.student)
    assert no_grad_from(kbm_loss, method.student)  # the bridge's loss never trains the student
    assert has_grad_from(losses["kbm_kd_student"], method.kbm)


def test_dml_stop_gradients():
    method, _ = build_method("dml", "resnet8", peers=["resnet8"])
    images, targets = batch()
    _, losses = method(images, targets, None)
    assert no_grad_from(losses["kl"], method.peers[0]) and has_grad_from(losses["kl"], method.student)
    assert no_grad_from(losses["peer1_kl"], method.student) and has_grad_from(losses["peer1_kl"], method.peers[0])


def test_ffcl_stop_gradients():
    method, _ = build_method("ffcl", "resnet8", "resnet20")
    images, targets = batch()
    _, losses = method(images, targets, None)
    assert no_grad_from(losses["mutual_to_student"], method.teacher)
    assert no_grad_from(losses["mutual_to_teacher"], method.student)
    for term in ("fused_to_student", "fused_to_teacher"):  # the fused head is only a target here
        assert no_grad_from(losses[term], method.fusion)
    assert no_grad_from(losses["fused_to_student"], method.teacher)
    assert no_grad_from(losses["at_to_student"], method.teacher)
    assert no_grad_from(losses["at_to_teacher"], method.student)
    assert has_grad_from(losses["ensemble_to_fused"], method.fusion)
    assert has_grad_from(losses["fused_ce"], method.student) and has_grad_from(losses["fused_ce"], method.teacher)


def test_prokt_phase_routing():
    method, _ = build_method("prokt", "resnet8", "resnet20", teacher_init="converged")
    images, targets = batch()
    _, teacher_losses = method(images, targets, None, phase="teacher")
    total = sum(teacher_losses.values())
    assert no_grad_from(total, method.student) and has_grad_from(total, method.teacher)
    _, student_losses = method(images, targets, None, phase="student")
    total = sum(student_losses.values())
    assert no_grad_from(total, method.teacher) and has_grad_from(total, method.student)
    phases = method.phases()
    assert list(phases) == ["teacher", "student"]
    groups = phases["teacher"].param_groups() + phases["student"].param_groups()
    assert [g["lr_scale"] for g in groups] == [0.1, 1.0]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in method.teacher.parameters()}
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in method.parameters()}
