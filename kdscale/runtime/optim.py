"""Optimizers and the learning-rate schedule.

The schedule is a pure function of the optimizer step, so resuming needs only the step
count. Epoch-based settings (milestones, warm-up) are converted with the number of
optimizer steps per epoch. Weight decay applies to every parameter, as in the
RepDistiller and torchvision reference recipes.
"""

from __future__ import annotations

import math

import torch

from kdscale.config.schema import OptimSection


def build_optimizer(params, optim: OptimSection) -> torch.optim.Optimizer:
    """``params``: parameters, or parameter groups (dicts) that may carry an ``lr_scale``."""
    params = list(params)
    if params and not isinstance(params[0], dict):
        params = [{"params": [p for p in params if p.requires_grad], "lr_scale": 1.0}]
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov,
                               weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)


def lr_at(step: int, steps_per_epoch: int, total_steps: int, optim: OptimSection) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    epoch = step / steps_per_epoch
    warmup_steps = optim.warmup_epochs * steps_per_epoch
    if warmup_steps > 0 and step < warmup_steps:
        return optim.lr * min(1.0, (step + 1) / warmup_steps)  # a fractional last warm-up step stops at the peak
    if optim.schedule == "multistep":
        return optim.lr * optim.gamma ** sum(1 for m in optim.milestones if epoch >= m)
    if optim.schedule == "cosine":
        span = max(1.0, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return optim.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the scheduled lr on every group, times the group's ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
