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


def standardize(row, eps=1e-7):
    """Logit standardization (Sun et al. 2024, their code's ``normalize``): (z - mean) / (eps + std),
    std with the K - 1 denominator."""
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / (eps + std) for v in row]


def dkd_terms(teacher_rows, student_rows, labels, t):
    """DKD (Zhao et al. 2022), written from the paper's definitions: b = [p_y, 1 - p_y] with
    p = softmax(z / T); q = softmax(z_c / T) over the non-target classes c only.
    Returns (T^2 mean KL(b_T || b_S), T^2 mean KL(q_T || q_S))."""
    tckd = nckd = 0.0
    for zt, zs, y in zip(teacher_rows, student_rows, labels):
        pt, ps = softmax(zt, t), softmax(zs, t)
        tckd += kl([pt[y], 1.0 - pt[y]], [ps[y], 1.0 - ps[y]])
        others = [c for c in range(len(zt)) if c != y]
        nckd += kl(softmax([zt[c] for c in others], t), softmax([zs[c] for c in others], t))
    n = len(labels)
    return tckd / n * t * t, nckd / n * t * t


def pearson(u, v, eps=1e-8):
    """Pearson correlation with DIST's eps on the product of the norms."""
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    du, dv = [a - mu for a in u], [b - mv for b in v]
    dot = sum(a * b for a, b in zip(du, dv))
    return dot / (math.sqrt(sum(a * a for a in du)) * math.sqrt(sum(b * b for b in dv)) + eps)


def dist_terms(teacher_rows, student_rows, tau):
    """DIST (Huang et al. 2022): with P = softmax(z / tau) per sample, inter = tau^2 (1 - mean over
    samples of pearson(P_S[i], P_T[i])), intra = tau^2 (1 - mean over classes of
    pearson(P_S[:, c], P_T[:, c])) (each class's column across the batch)."""
    ps = [softmax(z, tau) for z in student_rows]
    pt = [softmax(z, tau) for z in teacher_rows]
    inter = 1 - sum(pearson(a, b) for a, b in zip(ps, pt)) / len(ps)
    classes = len(ps[0])
    intra = 1 - sum(pearson([row[c] for row in ps], [row[c] for row in pt]) for c in range(classes)) / classes
    return inter * tau * tau, intra * tau * tau


# -- feature methods (FitNet, RKD, PKT, SP): rows are flattened per-sample feature vectors --
def flatten(nested):
    """A nested list (one sample's map) -> a flat list of numbers."""
    return [v for item in nested for v in flatten(item)] if isinstance(nested, list) else [nested]


def mean_squared_error(a_batch, b_batch):
    """FitNet's hint (nn.MSELoss): the mean of (a - b)^2 over every element of the batch."""
    a, b = flatten(a_batch), flatten(b_batch)
    return sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)


def _l2_normalized(row):
    norm = math.sqrt(sum(v * v for v in row))
    return [v / max(norm, 1e-12) for v in row]


def huber(x, y):
    """Smooth-L1 with threshold 1: (x - y)^2 / 2 below 1, |x - y| - 1/2 above."""
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


def rkd_distance_term(s_rows, t_rows, normalize=False):
    """Park et al. 2019 distance term: Euclidean distances over the mean distance of the distinct
    pairs, compared by Huber, averaged over all B x B pairs (self-pairs give 0 and 0)."""
    if normalize:
        s_rows, t_rows = [_l2_normalized(r) for r in s_rows], [_l2_normalized(r) for r in t_rows]
    b = len(s_rows)

    def scaled(rows):
        d = [[math.sqrt(sum((x - y) ** 2 for x, y in zip(rows[i], rows[j]))) if i != j else 0.0 for j in range(b)]
             for i in range(b)]
        mu = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return [[v / mu for v in row] for row in d]

    ds, dt = scaled(s_rows), scaled(t_rows)
    return sum(huber(ds[i][j], dt[i][j]) for i in range(b) for j in range(b)) / (b * b)


def rkd_angle_term(s_rows, t_rows, normalize=False):
    """Park et al. 2019 angle term: cos of the angle at e_i between e_j and e_k (0 when j or k is i),
    compared by Huber, averaged over all B^3 triplets."""
    if normalize:
        s_rows, t_rows = [_l2_normalized(r) for r in s_rows], [_l2_normalized(r) for r in t_rows]
    b = len(s_rows)

    def cos(rows, i, j, k):
        if j == i or k == i:
            return 0.0
        u = [x - y for x, y in zip(rows[j], rows[i])]
        v = [x - y for x, y in zip(rows[k], rows[i])]
        return sum(x * y for x, y in zip(u, v)) / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v)))

    total = sum(huber(cos(s_rows, i, j, k), cos(t_rows, i, j, k)) for i in range(b) for j in range(b) for k in range(b))
    return total / b ** 3


def pkt_term(s_rows, t_rows, eps=1e-7):
    """Passalis & Tefas 2018 (the authors' code): p(j|i) = K(i,j) / sum_k K(i,k) with the cosine
    kernel K = (cos + 1) / 2; mean over all B x B of p_T log((p_T + eps) / (p_S + eps))."""
    b = len(s_rows)

    def conditional(rows):
        unit = [[v / (math.sqrt(sum(x * x for x in r)) + eps) for v in r] for r in rows]
        k = [[(sum(x * y for x, y in zip(unit[i], unit[j])) + 1) / 2 for j in range(b)] for i in range(b)]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = conditional(s_rows), conditional(t_rows)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(b) for j in range(b)) / (b * b)


def sp_term(s_rows, t_rows):
    """Tung & Mori 2019: G = F F^T with each row L2-normalised; ||G_T - G_S||_F^2 / B^2."""
    b = len(s_rows)

    def gram(rows):
        return [_l2_normalized([sum(x * y for x, y in zip(rows[i], rows[j])) for j in range(b)]) for i in range(b)]

    gs, gt = gram(s_rows), gram(t_rows)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / (b * b)
