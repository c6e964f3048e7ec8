"""AM-RADIO's adaptor heads and feature losses (kdscale/methods/feature_adaptors.py) against
the float64 references of tests/helpers/reference_features.py, and their gradient routing."""

from __future__ import annotations

import pytest
import torch
from helpers import reference_features as ref

from kdscale.methods.feature_adaptors import MLPAdaptor, SpatialAdaptor, spatial_loss, summary_loss


def _layer(linear):
    return linear.weight.double().tolist(), linear.bias.double().tolist()


def _norm(ln):
    return ln.weight.double().tolist(), ln.bias.double().tolist()


@pytest.mark.parametrize("inner", [0, 2])
def test_mlp_adaptor_is_radios_mlp2(inner):
    torch.manual_seed(0)
    head = MLPAdaptor(5, 7, 3, inner=inner)
    for p in head.parameters():  # LayerNorm's ones and zeros would hide a swapped gamma/beta
        p.data.normal_()
    x = torch.randn(4, 5)
    expected = [ref.mlp2(row, _layer(head.fc1), [(_norm(b[0]), _layer(b[2])) for b in head.blocks],
                         (_norm(head.final[0]), _layer(head.final[2]))) for row in x.double().tolist()]
    torch.testing.assert_close(head(x).double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-5)


def test_summary_loss_is_the_mean_cosine_distance():
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 8), torch.randn(6, 8) * 50  # scale-free
    assert summary_loss(student, teacher).item() == pytest.approx(ref.summary_loss(student.tolist(), teacher.tolist()),
                                                                  rel=1e-6)
    assert summary_loss(teacher * 3, teacher).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("weights", [(0.9, 0.1), (1.0, 0.0), (0.0, 1.0)])
def test_spatial_loss_is_cosine_plus_smooth_l1_per_location(weights):
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5) * 2  # |d| on both sides of 1
    value = spatial_loss(student, teacher, *weights).item()
    assert value == pytest.approx(ref.spatial_loss(student.tolist(), teacher.tolist(), *weights), rel=1e-6)


def test_spatial_adaptor_runs_the_mlp_per_location_then_resizes_to_the_teachers_grid():
    torch.manual_seed(3)
    head = SpatialAdaptor(6, 8, 4, grid=(5, 5))
    x = torch.randn(2, 6, 3, 3)
    out = head(x)
    assert out.shape == (2, 4, 5, 5)
    per_location = torch.stack([torch.stack([head.mlp(x[:, :, i, j]) for j in range(3)], dim=-1)
                                for i in range(3)], dim=-2)  # (2, 4, 3, 3), location by location
    expected = torch.nn.functional.interpolate(per_location, size=(5, 5), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected)
    same = SpatialAdaptor(6, 8, 4, grid=(3, 3))
    same.load_state_dict(head.state_dict())
    torch.testing.assert_close(same(x), per_location)  # no resize on the teacher's own grid


def test_gradients_reach_the_student_and_its_heads_never_the_teacher():
    torch.manual_seed(4)
    student_map = torch.randn(2, 6, 4, 4, requires_grad=True)
    student_vec = torch.randn(2, 6, requires_grad=True)
    teacher_map = torch.randn(2, 5, 7, 7, requires_grad=True)
    teacher_vec = torch.randn(2, 5, requires_grad=True)
    spatial, summary = SpatialAdaptor(6, 5, 5, grid=(7, 7)), MLPAdaptor(6, 5, 5)
    loss = spatial_loss(spatial(student_map), teacher_map.detach()) + summary_loss(summary(student_vec),
                                                                                  teacher_vec.detach())
    loss.backward()
    assert student_map.grad.abs().sum() > 0 and student_vec.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [*spatial.parameters(), *summary.parameters()])
    assert teacher_map.grad is None and teacher_vec.grad is None
