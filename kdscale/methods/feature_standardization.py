"""Standardizing a teacher's feature targets before they are distilled (issue 27).

Foundation models' features differ in scale by orders of magnitude (a DINOv2 summary token
and a CLIP one do), so one teacher's loss can drown another's. PHI-S (Ranzinger et al. 2024,
"PHI-S: Distribution Balancing for Label-Free Multi-Teacher Distillation", arXiv 2410.01680)
standardizes each teacher's targets from statistics gathered before training; the student's
adaptor head then predicts the standardized target. Both forms here map a target ``x`` (its
channels last) to ``W (x - mu)``:

- ``channel``: ``W = diag(1 / std)``, each channel z-scored (the simple baseline);
- ``phi-s``: ``W = H U^T / phi`` with ``Sigma = U diag(lambda) U^T`` the targets' covariance
  (negative eigenvalues, numerical noise, set to 0), ``H`` a normalised Hadamard matrix and
  ``phi = sqrt(mean(lambda))``. ``U^T`` rotates onto the principal axes, ``H`` spreads every
  axis's variance evenly over all dimensions, so each standardized dimension has variance 1
  (isotropic), and the transform is a scaled rotation: cosine similarities between targets
  centred at ``mu`` are unchanged. Verified against NVlabs/RADIO ``examples/common/phi_s.py``
  (mean, ``torch.cov``, ``eigh``, clamped eigenvalues, ``H @ U.T`` times ``1 / sqrt(mean e)``).

Hadamard matrices (:func:`hadamard`): Sylvester's for powers of two, Paley's first
construction (order ``q + 1`` for a prime ``q = 3 mod 4``) times a Sylvester factor otherwise
(768 = 12 x 64: q = 11); for widths with neither, a random orthogonal matrix from a fixed seed,
as RADIO falls back to (isotropy then holds only approximately; a warning says so).

Statistics: the count, sum and sum of outer products of the targets (float64; a spatial map's
every location is one sample), summed over ranks, then the unbiased covariance.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

KINDS = ("none", "channel", "phi-s")


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def _sylvester(n: int) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < n:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def _paley(order: int) -> torch.Tensor:
    """Paley's first construction: ``q = order - 1`` prime, ``q = 3 mod 4``; ``I + S`` with
    ``S`` the skew bordered Jacobsthal matrix (entries +-1)."""
    q = order - 1
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if r in squares else -1.0 for r in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    jacobsthal = chi[(index[None, :] - index[:, None]) % q]  # chi(j - i): skew, as chi(-1) = -1
    skew = torch.zeros(order, order, dtype=torch.float64)
    skew[0, 1:], skew[1:, 0], skew[1:, 1:] = 1.0, -1.0, jacobsthal
    return torch.eye(order, dtype=torch.float64) + skew


def hadamard(n: int, seed: int = 0) -> tuple[torch.Tensor, bool]:
    """An orthogonal ``n x n`` matrix with entries ``+-1 / sqrt(n)`` (float64) and True; for an
    ``n`` no construction here reaches, a random orthogonal matrix (seeded) and False."""
    if n == 1 or n & (n - 1) == 0:
        return _sylvester(n) / n ** 0.5, True
    power = 1
    while n % (2 * power) == 0:
        power *= 2
    while power >= 1:  # n = power x order, order - 1 a prime = 3 mod 4
        order = n // power
        if _is_prime(order - 1) and (order - 1) % 4 == 3:
            return torch.kron(_sylvester(power), _paley(order)) / n ** 0.5, True
        power //= 2
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :], False


def transform_from_statistics(kind: str, count: float, total: torch.Tensor, outer: torch.Tensor,
                              where: str = "targets") -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu, W)`` in float64 from the count, sum ``(C,)`` and sum of outer products ``(C, C)``."""
    if count < 2:
        raise ValueError(f"{where}: standardization needs at least 2 samples, got {count:g}")
    mean = total / count
    covariance = (outer - count * torch.outer(mean, mean)) / (count - 1)
    if kind == "channel":
        std = covariance.diagonal().clamp_min(0).sqrt().clamp_min(1e-12)
        return mean, torch.diag(1.0 / std)
    eigenvalues, vectors = torch.linalg.eigh(covariance)
    eigenvalues = eigenvalues.clamp_min(0)
    rotation, exact = hadamard(mean.shape[0])
    if not exact:
        warnings.warn(f"{where}: no Hadamard matrix of order {mean.shape[0]} is built here (powers of 2, and Paley's "
                      f"orders times them); PHI-S uses a random orthogonal matrix, so the standardized dimensions' "
                      f"variances are equal only approximately", stacklevel=2)
    scale = eigenvalues.mean().sqrt().clamp_min(1e-12)
    return mean, rotation @ vectors.T / scale


class TargetStandardizer(nn.Module):
    """``W (x - mu)`` over the channel dimension (dim 1) of a summary ``(B, C)`` or a spatial map
    ``(B, C, H, W)``; its buffers are saved and resumed with the method. Identity until
    :meth:`set_statistics` (``ready`` says whether it ran)."""

    def __init__(self, channels: int, kind: str):
        super().__init__()
        self.kind = kind
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("transform", torch.eye(channels))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    def set_statistics(self, count: float, total: torch.Tensor, outer: torch.Tensor, where: str) -> None:
        mean, transform = transform_from_statistics(self.kind, count, total.double().cpu(), outer.double().cpu(),
                                                    where)
        self.mean.copy_(mean)
        self.transform.copy_(transform)
        self.ready.fill_(True)

    def forward(self, target: torch.Tensor) -> torch.Tensor:
        moved = target.float().movedim(1, -1)
        return ((moved - self.mean) @ self.transform.T).movedim(-1, 1)


def accumulate(target: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(count, sum, sum of outer products) of a target's rows, channels at dim 1, float64."""
    rows = target.double().movedim(1, -1).reshape(-1, target.shape[1])
    return float(rows.shape[0]), rows.sum(0), rows.T @ rows
