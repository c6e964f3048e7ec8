"""Independent reference of the ensemble targets (Hinton, Vinyals & Dean 2015: the mean of
the members' softened probabilities; or the mean of their logits) and of the KD, DKD, DIST
and DeiT terms on them, written from the formulas in float64 with explicit exponentials,
sums and loops. It imports nothing from kdscale and uses no ``torch.nn.functional`` loss.

Members are given as a list of ``(logits, weight)`` with weights summing to 1."""

from __future__ import annotations

import math

import torch


def softmax(logits: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    z = logits.detach().double() / t
    e = (z - z.max(dim=1, keepdim=True).values).exp()
    return e / e.sum(dim=1, keepdim=True)


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Per-row z-score with the unbiased std plus 1e-7 (Sun et al. 2024's ``normalize``)."""
    z = logits.detach().double()
    k = z.shape[1]
    mean = z.sum(dim=1, keepdim=True) / k
    std = (((z - mean) ** 2).sum(dim=1, keepdim=True) / (k - 1)).sqrt()
    return (z - mean) / (1e-7 + std)


def ensemble_probs(members, t: float) -> torch.Tensor:
    """``sum_i w_i softmax(z_i / t)``, a B x K matrix of probabilities."""
    total = None
    for logits, weight in members:
        term = weight * softmax(logits, t)
        total = term if total is None else total + term
    return total


def mean_logits(members) -> torch.Tensor:
    """``sum_i w_i z_i``."""
    total = None
    for logits, weight in members:
        term = weight * logits.detach().double()
        total = term if total is None else total + term
    return total


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """``mean over rows of sum_k p_k (log p_k - log q_k)`` (0 where p_k = 0)."""
    rows = []
    for pr, qr in zip(p.tolist(), q.tolist()):
        rows.append(sum(a * (math.log(a) - math.log(b)) for a, b in zip(pr, qr) if a > 0))
    return sum(rows) / len(rows)


def kd_terms(student: torch.Tensor, members, ids, t: float, mode: str, kd_weight: float,
             standardize_logits: bool = False) -> dict[str, float]:
    """The KD terms (``kd``, or ``kd_<id>`` per teacher) for one ensemble form."""
    s = standardize(student) if standardize_logits else student
    p_s = softmax(s, t)
    if mode == "per_teacher":
        out = {}
        for tid, (logits, weight) in zip(ids, members):
            z = standardize(logits) if standardize_logits else logits
            out[f"kd_{tid}"] = kd_weight * weight * t * t * kl(softmax(z, t), p_s)
        return out
    if mode == "logits":
        z = mean_logits(members)
        target = softmax(standardize(z) if standardize_logits else z, t)
    else:
        target = ensemble_probs(members, t)
    return {"kd": kd_weight * t * t * kl(target, p_s)}


def dkd_terms(student: torch.Tensor, target_probs: torch.Tensor, targets: torch.Tensor,
              t: float) -> tuple[float, float]:
    """``(T^2 KL(b_T || b_S), T^2 KL(q_T || q_S))`` batch-averaged, with the teacher given as its
    probability matrix: ``b = [p_y, 1 - p_y]``, ``q_c = p_c / (1 - p_y)`` over ``c != y``."""
    p_s = softmax(student, t)
    tckd = nckd = 0.0
    rows = len(targets)
    for pt, ps, y in zip(target_probs.tolist(), p_s.tolist(), targets.tolist()):
        bt, bs = [pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]]
        tckd += sum(a * (math.log(a) - math.log(b)) for a, b in zip(bt, bs))
        qt = [pt[c] / (1 - pt[y]) for c in range(len(pt)) if c != y]
        qs = [ps[c] / (1 - ps[y]) for c in range(len(ps)) if c != y]
        nckd += sum(a * (math.log(a) - math.log(b)) for a, b in zip(qt, qs) if a > 0)
    return t * t * tckd / rows, t * t * nckd / rows


def pearson(u: list[float], v: list[float], eps: float = 1e-8) -> float:
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    du, dv = [a - mu for a in u], [b - mv for b in v]
    num = sum(a * b for a, b in zip(du, dv))
    return num / (math.sqrt(sum(a * a for a in du)) * math.sqrt(sum(b * b for b in dv)) + eps)


def dist_terms(student: torch.Tensor, target_probs: torch.Tensor, tau: float) -> tuple[float, float]:
    """``(tau^2 (1 - mean_i rho(P_S[i], P_T[i])), tau^2 (1 - mean_c rho(P_S[:, c], P_T[:, c])))``
    with the teacher's probability matrix ``P_T`` given."""
    ps, pt = softmax(student, tau).tolist(), target_probs.tolist()
    inter = sum(pearson(a, b) for a, b in zip(ps, pt)) / len(ps)
    cols_s, cols_t = list(zip(*ps)), list(zip(*pt))
    intra = sum(pearson(list(a), list(b)) for a, b in zip(cols_s, cols_t)) / len(cols_s)
    return tau * tau * (1 - inter), tau * tau * (1 - intra)


def deit_soft(dist_logits: torch.Tensor, target_probs: torch.Tensor, tau: float, normalization: str = "numel") -> float:
    """``tau^2 sum_{i,k} KL`` to the given probability matrix, over ``B*K`` or ``B``."""
    total = kl(target_probs, softmax(dist_logits, tau)) * len(target_probs)
    denominator = dist_logits.numel() if normalization == "numel" else dist_logits.shape[0]
    return tau * tau * total / denominator


def deit_hard(dist_logits: torch.Tensor, target_scores: torch.Tensor) -> float:
    """CE of the distillation head against the argmax of the target (probabilities or logits)."""
    logp = softmax(dist_logits).log().tolist()
    labels = [max(range(len(row)), key=row.__getitem__) for row in target_scores.tolist()]
    return -sum(row[y] for row, y in zip(logp, labels)) / len(labels)
