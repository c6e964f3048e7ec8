"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on a device batch.

Applied before the teacher runs, so an online teacher sees exactly the student's mixed
view (as function matching, Beyer et al. 2022, prescribes). Targets become probability
vectors; stored teacher soft labels are mixed with the same pairs and weights. The mixing
draws come from a generator seeded by (run seed, rank, step), so a resumed run mixes the
same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdscale.config.schema import DataSection


def mixing_enabled(data: DataSection) -> bool:
    return data.mixup_alpha > 0 or data.cutmix_alpha > 0


def _beta(alpha: float, gen: torch.Generator) -> float:
    """Beta(alpha, alpha) by inverse-CDF on a grid (torch's Beta sampler takes no generator)."""
    grid = torch.linspace(1e-4, 1 - 1e-4, 4096, dtype=torch.float64)
    density = (grid * (1 - grid)).pow(alpha - 1)
    cdf = density.cumsum(0)
    u = torch.rand((), generator=gen, dtype=torch.float64) * cdf[-1]
    return float(grid[torch.searchsorted(cdf, u).clamp(max=grid.numel() - 1)])


def mix_batch(images: torch.Tensor, targets: torch.Tensor, data: DataSection, gen: torch.Generator,
              extra: torch.Tensor | None = None):
    """(mixed images, soft targets, mixed ``extra`` soft labels or None)."""
    soft = F.one_hot(targets, data.num_classes).float() if targets.dim() == 1 else targets
    if torch.rand((), generator=gen).item() >= data.mix_prob:
        return images, soft, extra
    use_cutmix = data.cutmix_alpha > 0 and (data.mixup_alpha <= 0 or
                                            torch.rand((), generator=gen).item() < data.mix_switch_prob)
    perm = torch.randperm(images.shape[0], generator=gen).to(images.device)
    if use_cutmix:
        lam = _beta(data.cutmix_alpha, gen)
        height, width = images.shape[-2:]
        cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(height, (), generator=gen)), int(torch.randint(width, (), generator=gen))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        images = images.clone()
        images[..., top:bottom, left:right] = images[perm][..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (height * width)  # the area actually pasted
    else:
        lam = _beta(data.mixup_alpha, gen)
        images = lam * images + (1 - lam) * images[perm]
    soft = lam * soft + (1 - lam) * soft[perm.to(soft.device)]
    if extra is not None:
        extra = lam * extra + (1 - lam) * extra[perm.to(extra.device)]
    return images, soft, extra


def batch_generator(seed: int, rank: int, epoch: int, batch_index: int) -> torch.Generator:
    """The generator of one micro-batch's mixing draws: a function of where the batch is in
    the run, so a resumed run draws the same."""
    draw = seed
    for part in (rank, epoch, batch_index):
        draw = (draw * 1_000_003 + part) % 2**62
    return torch.Generator().manual_seed(draw)
