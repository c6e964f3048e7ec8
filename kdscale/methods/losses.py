"""Loss functions shared by the methods. Every method builds its terms from these, so
each formula exists once.

Notation follows ``docs``/methods: ``p^T = softmax(z / T)``; KL is averaged over the
batch (``batchmean``); logit terms are computed in float32 even under bf16 autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardization (Sun et al., CVPR 2024): each sample's logits z-scored over the
    classes, ``(z - mean(z)) / (eps + std(z))``, before any temperature.

    As the authors' code (verified: sunshangquan/logit-standardization-KD
    ``mdistiller/distillers/KD.py`` and ``DKD.py``, ``normalize``): ``std`` is torch's default,
    the unbiased one (divides by K - 1), and ``eps = 1e-7`` is added to it. The gradient
    flows through the mean and the std (neither is detached)."""
    z = logits.float()
    return (z - z.mean(dim=1, keepdim=True)) / (eps + z.std(dim=1, keepdim=True))


def soft_kl(target_logits: torch.Tensor, input_logits: torch.Tensor, temperature: float = 1.0,
            t_squared: bool = True, standardize: bool = False) -> torch.Tensor:
    """``T^2 * KL(softmax(target/T) || softmax(input/T))``, averaged over the batch.

    The gradient flows into ``input_logits`` and, unless the caller detaches it, into
    ``target_logits`` too: stop-gradients are the caller's explicit choice. With
    ``t_squared`` (Hinton et al. 2015) the term is multiplied by ``T^2`` so its gradient
    scale does not change with the temperature. With ``standardize`` both sides are
    z-scored first (:func:`standardize_logits`) and ``temperature`` is the base temperature.
    """
    t = float(temperature)
    if standardize:
        target_logits, input_logits = standardize_logits(target_logits), standardize_logits(input_logits)
    log_p_input = F.log_softmax(input_logits.float() / t, dim=1)
    log_p_target = F.log_softmax(target_logits.float() / t, dim=1)
    kl = F.kl_div(log_p_input, log_p_target, reduction="batchmean", log_target=True)
    return kl * (t * t) if t_squared else kl


def attention_map(feature: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017 attention: channel mean of squared activations, resized
    to ``size`` if given (bilinear; maps have no channels, so no parameters are needed),
    flattened and L2-normalised per sample. Shape (B, H*W)."""
    q = feature.float().pow(2).mean(dim=1, keepdim=True)
    if size is not None and tuple(q.shape[-2:]) != tuple(size):
        q = F.interpolate(q, size=size, mode="bilinear", align_corners=False)
    return F.normalize(q.flatten(1), dim=1)


def attention_transfer(student_features: list[torch.Tensor], teacher_features: list[torch.Tensor],
                       beta: float, mode: str = "code") -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017) summed over the paired layers ``j``.

    ``mode="code"`` (default; verified: szagoruyko/attention-transfer ``utils.py``/``cifar.py``,
    ``beta * sum(at_losses)`` with ``at_loss = (at(x) - at(y)).pow(2).mean()``; RepDistiller
    and torchdistill's ``mode: code`` alike): ``beta * sum_j mean_{batch, positions}
    (q_S^j - q_T^j)^2``. The published ``beta = 1e3`` goes with this form. No factor 1/2.

    ``mode="paper"`` (Eq. 2 of the paper): ``beta/2 * sum_j mean_batch ||q_S^j - q_T^j||_2``,
    the L2 norm itself (not its square) over the positions.

    Student maps are resized to the teacher's spatial size. Gradients reach both sides
    unless the caller detaches one.
    """
    total = student_features[0].new_zeros((), dtype=torch.float32)
    for fs, ft in zip(student_features, teacher_features, strict=True):
        qt = attention_map(ft)
        qs = attention_map(fs, size=tuple(ft.shape[-2:]))
        if mode == "paper":
            total = total + (qs - qt).norm(p=2, dim=1).mean()
        else:
            total = total + (qs - qt).pow(2).mean()
    return beta / 2 * total if mode == "paper" else beta * total


def soft_kl_to_probs(target_probs: torch.Tensor, input_logits: torch.Tensor, temperature: float = 1.0,
                     t_squared: bool = True) -> torch.Tensor:
    """Like :func:`soft_kl` for a target given as probabilities (an ensemble mean, a
    virtual teacher): ``T^2 * KL(q || softmax(input/T))``, batch-averaged."""
    t = float(temperature)
    kl = F.kl_div(F.log_softmax(input_logits.float() / t, dim=1), target_probs.float(), reduction="batchmean")
    return kl * (t * t) if t_squared else kl
