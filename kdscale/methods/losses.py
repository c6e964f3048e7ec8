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


def soft_kl(target_logits: torch.Tensor, input_logits: torch.Tensor, temperature: float = 1.0,
            t_squared: bool = True) -> torch.Tensor:
    """``T^2 * KL(softmax(target/T) || softmax(input/T))``, averaged over the batch.

    The gradient flows into ``input_logits`` and, unless the caller detaches it, into
    ``target_logits`` too: stop-gradients are the caller's explicit choice. With
    ``t_squared`` (Hinton et al. 2015) the term is multiplied by ``T^2`` so its gradient
    scale does not change with the temperature.
    """
    t = float(temperature)
    log_p_input = F.log_softmax(input_logits.float() / t, dim=1)
    log_p_target = F.log_softmax(target_logits.float() / t, dim=1)
    kl = F.kl_div(log_p_input, log_p_target, reduction="batchmean", log_target=True)
    return kl * (t * t) if t_squared else kl
