"""Golden values of the feature standardization (kdscale/methods/feature_standardization.py):
Hadamard matrices, the channel and PHI-S transforms against numpy references written from
the formulas, the standardizer on summaries and maps, the statistics' sums, and the
``features`` method's use of them (targets standardized, no gradient into them, ready after
:meth:`set_feature_statistics`, nothing to gather after a resume)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdscale.methods.feature_standardization import (
    TargetStandardizer,
    accumulate,
    hadamard,
    transform_from_statistics,
)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 40, 96, 384, 768, 1024])
def test_hadamard_is_orthogonal_with_equal_magnitude_entries(n):
    matrix, exact = hadamard(n)
    assert exact
    np.testing.assert_allclose(matrix.numpy() @ matrix.numpy().T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(np.abs(matrix.numpy()) * np.sqrt(n), np.ones((n, n)), atol=1e-12)


def test_hadamard_of_an_unreachable_order_is_a_seeded_orthogonal_matrix():
    a, exact = hadamard(100)
    b, _ = hadamard(100)
    assert not exact and torch.equal(a, b)
    np.testing.assert_allclose(a.numpy() @ a.numpy().T, np.eye(100), atol=1e-12)


def correlated(rows=4000, width=12, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.logspace(-2, 2, width)  # variances over eight orders of magnitude, as teachers' differ
    return (rng.normal(size=(rows, width)) * scales) @ rng.normal(size=(width, width)) + rng.normal(size=width) * 10


def statistics(x: np.ndarray):
    count, total, outer = accumulate(torch.from_numpy(x))
    return count, total, outer


def test_accumulate_sums_rows_and_outer_products():
    x = correlated(rows=50, width=5)
    count, total, outer = statistics(x)
    assert count == 50
    np.testing.assert_allclose(total.numpy(), x.sum(0), rtol=1e-12)
    np.testing.assert_allclose(outer.numpy(), x.T @ x, rtol=1e-12)
    spatial = torch.randn(3, 4, 2, 5, dtype=torch.float64)  # every location of a (C=4) map is a row
    count, total, _ = accumulate(spatial)
    assert count == 30 and torch.allclose(total, spatial.sum(dim=(0, 2, 3)))


def test_channel_standardization_is_the_per_channel_z_score():
    x = correlated()
    mean, transform = transform_from_statistics("channel", *statistics(x))
    np.testing.assert_allclose(mean.numpy(), x.mean(0), rtol=1e-9)
    np.testing.assert_allclose(transform.numpy(), np.diag(1 / x.std(0, ddof=1)), rtol=1e-7)


def test_phi_s_is_a_scaled_rotation_giving_every_dimension_unit_variance():
    x = correlated()
    mean, transform = transform_from_statistics("phi-s", *statistics(x))
    covariance = np.cov(x.T)  # numpy's unbiased covariance, independent of the sums
    eigenvalues = np.clip(np.linalg.eigvalsh(covariance), 0, None)
    scale = np.sqrt(eigenvalues.mean())
    w = transform.numpy()
    np.testing.assert_allclose(mean.numpy(), x.mean(0), rtol=1e-9)
    np.testing.assert_allclose(w @ w.T, np.eye(12) / scale ** 2, rtol=1e-6, atol=1e-12)  # a rotation / phi
    np.testing.assert_allclose(np.diag(w @ covariance @ w.T), np.ones(12), rtol=1e-6)  # isotropic: each var 1
    y = (x - mean.numpy()) @ w.T
    np.testing.assert_allclose(y.var(0, ddof=1), np.ones(12), rtol=1e-6)


def test_standardizer_maps_summaries_and_maps_over_their_channels():
    standardizer = TargetStandardizer(4, "phi-s")
    summary = torch.randn(6, 4)
    assert torch.equal(standardizer(summary), summary) and not bool(standardizer.ready)  # identity before
    x = torch.from_numpy(correlated(rows=500, width=4))
    standardizer.set_statistics(*accumulate(x), where="t")
    assert bool(standardizer.ready)
    mean, w = standardizer.mean.double().numpy(), standardizer.transform.double().numpy()
    np.testing.assert_allclose(standardizer(summary).numpy(), (summary.double().numpy() - mean) @ w.T, rtol=1e-4,
                               atol=1e-5)
    spatial = torch.randn(2, 4, 3, 5)
    expected = np.einsum("bchw,dc->bdhw", spatial.double().numpy() - mean[None, :, None, None], w)
    np.testing.assert_allclose(standardizer(spatial).numpy(), expected, rtol=1e-4, atol=1e-5)
    state = standardizer.state_dict()
    assert set(state) == {"mean", "transform", "ready"}  # saved and resumed with the method


def test_too_few_samples_is_refused():
    with pytest.raises(ValueError, match="t: standardization needs at least 2 samples, got 1"):
        transform_from_statistics("channel", 1.0, torch.zeros(3, dtype=torch.float64),
                                  torch.zeros(3, 3, dtype=torch.float64), where="t")


def test_features_method_standardizes_its_targets():
    from helpers.methods import build_method

    method, teacher_output = build_method("features", teacher="resnet20", standardize="channel")
    wanted = method.feature_statistics()
    assert set(wanted) == {"teacher_summary", "teacher_spatial"} and wanted["teacher_summary"] == ("teacher", "summary")
    images = torch.randn(4, 3, 32, 32)
    output = teacher_output(images)
    for name, (tid, kind) in wanted.items():
        target = (output.member_features[tid][kind] * 50 + 7).detach().requires_grad_()  # another scale
        output.member_features[tid][kind] = target
        method.set_feature_statistics(name, *accumulate(target.detach()))
    assert method.feature_statistics() == {}  # gathered: a resume (buffers in the checkpoint) gathers none
    summary = output.member_features["teacher"]["summary"]
    standardized = method._teacher_targets(output, "teacher", "summary")
    z = (summary.detach().double() - summary.detach().double().mean(0)) / summary.detach().double().std(0)
    assert torch.allclose(standardized.double(), z, atol=1e-4)
    logits, terms = method.forward_train(images, torch.zeros(4, dtype=torch.long), output)
    terms["summary_teacher"].backward()
    assert summary.grad is None  # the standardized target carries no gradient
    assert all(p.grad is not None for p in method.adaptors["teacher_summary"].parameters())
