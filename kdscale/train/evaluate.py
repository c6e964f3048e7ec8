"""Validation: top-1/top-5 of every trainable network and every frozen teacher, plus
student-teacher top-1 agreement, over an exact pass reduced across ranks."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from kdscale.train.teachers import FrozenTeacher


def _topk_hits(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == targets[:, None]).any(dim=1).sum()


@torch.no_grad()
def evaluate(networks: dict[str, nn.Module], teacher: FrozenTeacher | None, loader, accelerator,
             autocast_dtype: torch.dtype | None, channels_last: bool) -> dict[str, float]:
    """``networks`` maps names (``student``, ...) to modules; they are scored in eval mode."""
    device = accelerator.device
    names = list(networks) + (["teacher"] if teacher is not None else [])
    # Per name: top-1 hits, top-5 hits; then agreement hits and the sample count.
    counts = torch.zeros(2 * len(names) + 2, dtype=torch.float64, device=device)
    modes = {name: net.training for name, net in networks.items()}
    for net in networks.values():
        net.eval()
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    try:
        for images, targets, _keys in loader:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)
            outputs = {}
            with autocast:
                for name, net in networks.items():
                    outputs[name] = net(images).float()
            if teacher is not None:
                outputs["teacher"] = teacher(images).logits.float()
            for i, name in enumerate(names):
                counts[2 * i] += _topk_hits(outputs[name], targets, 1)
                counts[2 * i + 1] += _topk_hits(outputs[name], targets, 5)
            if teacher is not None:
                agree = outputs["student"].argmax(1) == outputs["teacher"].argmax(1)
                counts[-2] += agree.sum()
            counts[-1] += targets.numel()
    finally:
        for name, net in networks.items():
            net.train(modes[name])
    counts = accelerator.reduce(counts, reduction="sum") if accelerator.num_processes > 1 else counts
    total = max(1.0, counts[-1].item())
    metrics = {"val/samples": counts[-1].item()}
    for i, name in enumerate(names):
        metrics[f"val/{name}_top1"] = 100.0 * counts[2 * i].item() / total
        metrics[f"val/{name}_top5"] = 100.0 * counts[2 * i + 1].item() / total
    if teacher is not None:
        metrics["val/agreement_top1"] = 100.0 * counts[-2].item() / total
    return metrics
