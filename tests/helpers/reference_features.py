"""Independent float64 references for the feature-distillation terms (issue 27), written
from the formulas with plain loops over samples and locations (AM-RADIO's recipe as
kdscale/methods/feature_adaptors.py states it), not from kdscale's code."""

from __future__ import annotations

import math


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / max(na * nb, 1e-8)


def summary_loss(student, teacher) -> float:
    """student, teacher: lists of B vectors."""
    return sum(1 - _cos(s, t) for s, t in zip(student, teacher)) / len(student)


def _smooth_l1(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def spatial_loss(student, teacher, cosine_weight=0.9, smooth_l1_weight=0.1) -> float:
    """student, teacher: nested lists [B][C][H][W] on the same grid."""
    batch, channels = len(teacher), len(teacher[0])
    height, width = len(teacher[0][0]), len(teacher[0][0][0])
    cosine, l1 = 0.0, 0.0
    for b in range(batch):
        for h in range(height):
            for w in range(width):
                s = [student[b][c][h][w] for c in range(channels)]
                t = [teacher[b][c][h][w] for c in range(channels)]
                cosine += 1 - _cos(s, t)
                l1 += sum(_smooth_l1(x - y) for x, y in zip(s, t))
    return (cosine_weight * cosine / (batch * height * width)
            + smooth_l1_weight * l1 / (batch * channels * height * width))


def mlp2(x, fc1, blocks, final):
    """RADIO's MLP2 on one vector: fc1, residual LayerNorm-GELU-Linear blocks, LayerNorm-GELU-
    Linear. Each layer is (weight rows, bias); a LayerNorm is (gamma, beta), eps 1e-5."""
    def linear(v, layer):
        weight, bias = layer
        return [sum(wi * vi for wi, vi in zip(row, v)) + b for row, b in zip(weight, bias)]

    def norm_gelu(v, ln):
        gamma, beta = ln
        mean = sum(v) / len(v)
        var = sum((x - mean) ** 2 for x in v) / len(v)
        normed = [(x - mean) / math.sqrt(var + 1e-5) * g + bb for x, g, bb in zip(v, gamma, beta)]
        return [0.5 * x * (1 + math.erf(x / math.sqrt(2))) for x in normed]

    h = linear(x, fc1)
    for ln, layer in blocks:
        h = [a + b for a, b in zip(h, linear(norm_gelu(h, ln), layer))]
    ln, layer = final
    return linear(norm_gelu(h, ln), layer)
