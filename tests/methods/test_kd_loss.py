"""KD loss golden values against independent computations (plain Python math and a
hand-worked case), including the T^2 factor."""

from __future__ import annotations

import math

import pytest
import torch

from kdscale.methods import MethodContext, TeacherOutput, get_method_class
from kdscale.methods.losses import soft_kl


def softmax(row, t):
    exps = [math.exp(v / t) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def reference_kl(teacher_rows, student_rows, t):
    """KL(p_t || p_s) at temperature t, summed over classes, averaged over rows."""
    total = 0.0
    for zt, zs in zip(teacher_rows, student_rows):
        pt, ps = softmax(zt, t), softmax(zs, t)
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    return total / len(teacher_rows)


def reference_ce(rows, targets):
    total = 0.0
    for z, y in zip(rows, targets):
        total += math.log(sum(math.exp(v) for v in z)) - z[y]
    return total / len(rows)


def test_hand_worked_case_with_t_squared():
    # Teacher logits [0, 2 ln 3] at T=2 give p_T = [1/4, 3/4]; the student's [0, 0] give [1/2, 1/2].
    # KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812..., times T^2 = 4 -> 0.523248...
    teacher = torch.tensor([[0.0, 2 * math.log(3)]])
    student = torch.zeros(1, 2)
    expected_kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert soft_kl(teacher, student, temperature=2.0, t_squared=False).item() == pytest.approx(expected_kl, rel=1e-6)
    assert soft_kl(teacher, student, temperature=2.0).item() == pytest.approx(4 * expected_kl, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 7.5])
def test_kd_method_terms_match_reference(temperature):
    gen = torch.Generator().manual_seed(11)
    teacher_logits = torch.randn(6, 5, generator=gen) * 3
    targets = torch.randint(0, 5, (6,), generator=gen)
    student = torch.nn.Linear(4, 5)
    images = torch.randn(6, 4, generator=gen)
    params = get_method_class("kd").Params(temperature=temperature, ce_weight=0.3, kd_weight=0.7)
    method = get_method_class("kd")(student, params, MethodContext(5, 32)).train()
    logits, losses = method(images, targets, TeacherOutput(teacher_logits))
    assert set(losses) == {"ce", "kd"}
    s_rows, t_rows = logits.tolist(), teacher_logits.tolist()
    assert losses["ce"].item() == pytest.approx(0.3 * reference_ce(s_rows, targets.tolist()), rel=1e-5)
    expected_kd = 0.7 * temperature ** 2 * reference_kl(t_rows, s_rows, temperature)
    assert losses["kd"].item() == pytest.approx(expected_kd, rel=1e-5)


def test_kd_gradient_reaches_student_only():
    teacher_logits = torch.randn(4, 3, requires_grad=True)
    student = torch.nn.Linear(2, 3)
    method = get_method_class("kd")(student, get_method_class("kd").Params(), MethodContext(3, 32)).train()
    _, losses = method(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]), TeacherOutput(teacher_logits))
    sum(losses.values()).backward()
    assert teacher_logits.grad is None
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0


def test_vanilla_is_plain_cross_entropy_with_label_smoothing():
    student = torch.nn.Linear(3, 4)
    images, targets = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
    method = get_method_class("vanilla")(student, get_method_class("vanilla").Params(),
                                         MethodContext(4, 32, label_smoothing=0.1)).train()
    logits, losses = method(images, targets, None)
    # Label smoothing eps: target distribution (1-eps) on y plus eps/K on every class.
    eps, k = 0.1, 4
    expected = 0.0
    for z, y in zip(logits.tolist(), targets.tolist()):
        log_norm = math.log(sum(math.exp(v) for v in z))
        expected += sum(((1 - eps) * (c == y) + eps / k) * (log_norm - z[c]) for c in range(k))
    assert losses["ce"].item() == pytest.approx(expected / 5, rel=1e-5)
