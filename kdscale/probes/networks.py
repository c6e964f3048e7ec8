"""The probes' networks and data: BatchNorm-free, so a batch split over ranks changes
nothing but the split, and fixed global batches (seeded) every rank slices its share of."""

from __future__ import annotations

import torch
from torch import nn

GLOBAL_BATCH, STEPS, CLASSES, SAMPLES = 8, 5, 10, 64


class PlainNet(nn.Module):
    """Stem + two conv stages + linear, without BatchNorm: per-rank batches then change
    nothing but the split. The stem is the same for every width (CTKD shares it)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(16, width, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(width, width, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(width, CLASSES)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(self.relu(self.conv1(x)))).mean(dim=(2, 3)))


def global_batches():
    """(images, targets, dataset indices) of each step; the indices are distinct within a step."""
    gen, index_gen = torch.Generator().manual_seed(123), torch.Generator().manual_seed(321)
    for _ in range(STEPS):
        images = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=gen)
        yield (images, torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=gen),
               torch.randperm(SAMPLES, generator=index_gen)[:GLOBAL_BATCH])


def linear_stack() -> nn.Module:
    """16 equal layers: no one layer is a large share of the network."""
    return nn.Sequential(*(nn.Linear(32, 32) for _ in range(16)))
