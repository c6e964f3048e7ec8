"""Independent reference of DeiT's loss (Touvron et al. 2021), in plain torch from the
formulas of facebookresearch/deit ``losses.py``, for golden-value tests. Written out with
explicit softmaxes and sums in float64; it imports nothing from kdscale and does not call
``torch.nn.functional``'s losses."""

from __future__ import annotations

import torch


def log_probs(logits: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    z = logits.double() / t
    z = z - z.max(dim=1, keepdim=True).values
    return z - z.exp().sum(dim=1, keepdim=True).log()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> float:
    """Mean over the batch of ``-sum_k q_k log p_k``; ``targets`` are class indices or rows of
    probabilities; label smoothing mixes ``q`` with the uniform distribution."""
    logp = log_probs(logits)
    classes = logits.shape[1]
    if targets.dim() == 1:
        q = torch.zeros_like(logp)
        q[torch.arange(len(targets)), targets] = 1.0
    else:
        q = targets.double()
    q = q * (1 - smoothing) + smoothing / classes
    return float(-(q * logp).sum(dim=1).mean())


def soft_distillation(dist_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float,
                      normalization: str = "numel") -> float:
    """``tau^2 * sum_{i,k} p_T (log p_T - log p_S)`` over ``B*K`` (numel, the authors' code) or ``B``."""
    log_t, log_s = log_probs(teacher_logits, tau), log_probs(dist_logits, tau)
    total = (log_t.exp() * (log_t - log_s)).sum()
    denominator = dist_logits.numel() if normalization == "numel" else dist_logits.shape[0]
    return float(total * tau * tau / denominator)


def hard_distillation(dist_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """CE against the teacher's top-1 class."""
    return cross_entropy(dist_logits, teacher_logits.argmax(dim=1))


def deit_terms(class_logits, dist_logits, teacher_logits, targets, distillation="hard", alpha=0.5, tau=1.0,
               normalization="numel", smoothing=0.0) -> dict[str, float]:
    """``{"ce": (1 - alpha) CE(z_cls, y), "dist": alpha L_dist(z_dist, z_T)}``."""
    if distillation == "soft":
        distill = soft_distillation(dist_logits, teacher_logits, tau, normalization)
    else:
        distill = hard_distillation(dist_logits, teacher_logits)
    return {"ce": (1 - alpha) * cross_entropy(class_logits, targets, smoothing), "dist": alpha * distill}
