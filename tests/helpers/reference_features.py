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


def resize_bilinear(channels, out_h: int, out_w: int):
    """A ``[C][H][W]`` map resized to ``out_h x out_w``, bilinear with half-pixel centres
    (``align_corners=False``); shrinking averages with the triangle filter stretched by the
    scale (the antialiased resize of PIL), growing interpolates the two nearest source pixels,
    the edge one repeated past the border."""
    def weights(n_in: int, n_out: int):
        scale = n_in / n_out
        rows = []
        for i in range(n_out):
            if scale > 1:
                center = scale * (i + 0.5)
                lo, hi = max(int(center - scale + 0.5), 0), min(int(center + scale + 0.5), n_in)
                taps = {j: max(0.0, 1 - abs((j - center + 0.5) / scale)) for j in range(lo, hi)}
                total = sum(taps.values())
                rows.append({j: w / total for j, w in taps.items()})
            else:
                src = max((i + 0.5) * scale - 0.5, 0.0)
                j0 = int(math.floor(src))
                j1, frac = min(j0 + 1, n_in - 1), src - j0
                row = {j0: 1 - frac}
                row[j1] = row.get(j1, 0.0) + frac
                rows.append(row)
        return rows

    wh, ww = weights(len(channels[0]), out_h), weights(len(channels[0][0]), out_w)
    return [[[sum(a * b * plane[y][x] for y, a in wh[i].items() for x, b in ww[j].items()) for j in range(out_w)]
             for i in range(out_h)] for plane in channels]


def spatial_adaptor(student_map, layers, grid):
    """The MLP2 (``layers``: :func:`mlp2`'s ``fc1, blocks, final``) at every location of a
    ``[C][H][W]`` map, then resized to the teacher's ``grid`` when it differs."""
    channels, height, width = len(student_map), len(student_map[0]), len(student_map[0][0])
    out = [[None] * width for _ in range(height)]
    for h in range(height):
        for w in range(width):
            out[h][w] = mlp2([student_map[c][h][w] for c in range(channels)], *layers)
    mapped = [[[out[h][w][c] for w in range(width)] for h in range(height)] for c in range(len(out[0][0]))]
    return mapped if (height, width) == tuple(grid) else resize_bilinear(mapped, *grid)


def _log_softmax(row):
    top = max(row)
    lse = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - lse for x in row]


def cross_entropy(logits, labels, smoothing: float = 0.0) -> float:
    """Batch mean of ``(1 - e) (-log p_y) + e mean_k (-log p_k)``."""
    total = 0.0
    for row, y in zip(logits, labels):
        logp = _log_softmax(row)
        total += (1 - smoothing) * -logp[y] + smoothing * -sum(logp) / len(logp)
    return total / len(logits)


def kd_kl(teacher_logits, student_logits, temperature: float) -> float:
    """``T^2 KL(p_T^T || p_S^T)``, averaged over the batch."""
    total = 0.0
    for t_row, s_row in zip(teacher_logits, student_logits):
        lt = _log_softmax([x / temperature for x in t_row])
        ls = _log_softmax([x / temperature for x in s_row])
        total += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
    return temperature ** 2 * total / len(teacher_logits)


def features_terms(student_summary, student_map, student_logits, labels, teachers, weights, params, smoothing=0.0):
    """Every loss term of the ``features`` method (AM-RADIO's recipe, kdscale/methods/features.py's
    docstring). ``student_summary``: [B][D]; ``student_map``: [B][C][H][W]; ``teachers``: id ->
    {kind: (adaptor layers, target)} with the target [B][D] or [B][C][H][W]; ``weights``: every
    teacher's entry weight by id (also those without feature targets); ``params``: the method's
    params as a dict, ``teacher_logits`` in it for the KD term."""
    total = sum(weights[tid] for tid in teachers)
    terms = {}
    for tid, kinds in teachers.items():
        w = weights[tid] / total
        if "summary" in kinds:
            layers, target = kinds["summary"]
            adapted = [mlp2(row, *layers) for row in student_summary]
            terms[f"summary_{tid}"] = params["summary_weight"] * w * summary_loss(adapted, target)
        if "spatial" in kinds:
            layers, target = kinds["spatial"]
            grid = (len(target[0][0]), len(target[0][0][0]))
            adapted = [spatial_adaptor(m, layers, grid) for m in student_map]
            terms[f"spatial_{tid}"] = params["spatial_weight"] * w * spatial_loss(
                adapted, target, params["cosine_weight"], params["smooth_l1_weight"])
    if params.get("ce_weight", 0) > 0:
        terms["ce"] = params["ce_weight"] * cross_entropy(student_logits, labels, smoothing)
    if params.get("kd_weight", 0) > 0:
        terms["kd"] = params["kd_weight"] * kd_kl(params["teacher_logits"], student_logits, params["temperature"])
    return terms
