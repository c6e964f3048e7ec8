"""Independent reference formulas in plain Python (lists and math), written from the
method notes, for golden-value tests. Nothing here calls kdscale or torch.nn.functional."""

from __future__ import annotations

import math


def softmax(row, t=1.0):
    top = max(v / t for v in row)
    exps = [math.exp(v / t - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def kd_term(target_rows, input_rows, t, t_squared=True):
    """T^2 * KL(softmax(target/T) || softmax(input/T)), batch mean."""
    value = sum(kl(softmax(a, t), softmax(b, t)) for a, b in zip(target_rows, input_rows)) / len(target_rows)
    return value * t * t if t_squared else value


def kl_to_probs(target_probs, input_rows, t, t_squared=True):
    value = sum(kl(q, softmax(b, t)) for q, b in zip(target_probs, input_rows)) / len(input_rows)
    return value * t * t if t_squared else value


def ce(rows, targets):
    return sum(-math.log(softmax(z)[y]) for z, y in zip(rows, targets)) / len(rows)


def attention(feature, pool=1):
    """feature: [C][H][W] nested lists -> normalised flattened channel-mean of squares,
    optionally average-pooled by ``pool`` x ``pool`` blocks first (= bilinear 2x downsizing)."""
    channels, height, width = len(feature), len(feature[0]), len(feature[0][0])
    q = [[sum(feature[c][i][j] ** 2 for c in range(channels)) / channels for j in range(width)]
         for i in range(height)]
    if pool > 1:
        q = [[sum(q[i * pool + a][j * pool + b] for a in range(pool) for b in range(pool)) / pool ** 2
              for j in range(width // pool)] for i in range(height // pool)]
    flat = [v for row in q for v in row]
    norm = math.sqrt(sum(v * v for v in flat))
    return [v / norm for v in flat]


def at_term(student_layers, teacher_layers, beta, mode="code", pool=1):
    """student_layers/teacher_layers: lists (per layer) of batches [B][C][H][W].

    code: beta * sum_j mean over batch and positions of (q_S - q_T)^2 (the authors' code);
    paper: beta/2 * sum_j mean over batch of sqrt(sum over positions of (q_S - q_T)^2) (Eq. 2)."""
    total = 0.0
    for fs, ft in zip(student_layers, teacher_layers):
        per_sample = []
        for s, t in zip(fs, ft):
            qs, qt = attention(s, pool), attention(t)
            squared = [(a - b) ** 2 for a, b in zip(qs, qt)]
            per_sample.append(math.sqrt(sum(squared)) if mode == "paper" else sum(squared) / len(squared))
        total += sum(per_sample) / len(per_sample)
    return beta / 2 * total if mode == "paper" else beta * total


def squared_error_sum(target_rows, input_rows):
    """sum over classes of (target - input)^2, averaged over the batch (CTKD's hint)."""
    return sum(sum((a - b) ** 2 for a, b in zip(t, s)) for t, s in zip(target_rows, input_rows)) / len(input_rows)


def mean_rows(a_rows, b_rows):
    return [[(a + b) / 2 for a, b in zip(ra, rb)] for ra, rb in zip(a_rows, b_rows)]


def rampup(epoch, length):
    """FFL's consistency weight: exp(-5 (1 - e/L)^2) while e < L, then 1."""
    if length == 0 or epoch >= length:
        return 1.0
    return math.exp(-5.0 * (1.0 - epoch / length) ** 2)
