"""Adaptor heads and losses for distilling a teacher's features (issue 27, AM-RADIO's recipe).

AM-RADIO (Ranzinger, Heinrich, Kautz & Molchanov, CVPR 2024, arXiv 2312.06709) gives the
student one trained adaptor head per teacher and per kind of feature
(:mod:`kdscale.models.feature_targets`: the summary vector and the spatial map), and matches
the adapted student features to the teacher's.

The heads (verified: NVlabs/RADIO ``radio/adaptor_mlp.py``, ``MLP2``, the released
adaptors' class): ``fc1`` (Linear in -> hidden), then ``inner`` residual blocks
``x + Linear(GELU(LayerNorm(x)))``, then ``Linear(GELU(LayerNorm(x)))`` (hidden -> out). The
spatial head is the same MLP applied at every location of the student's map (a stack of
1x1 convolutions), then resized to the teacher's grid. Choices (inferred, stated):
- ``hidden`` defaults to the teacher's width (:class:`MLPAdaptor` takes it explicitly);
  ``inner = 0`` (RADIO's released heads use more; a config may set it);
- the resize comes after the MLP, bilinear, ``align_corners=False``, antialiased when it
  shrinks (the student's grid usually differs from a ViT teacher's: a ResNet-50 at 224 px
  has 7x7, a ViT-L/14 16x16), so the loss is taken on the teacher's grid, token for token;
- the RADIO repository ships inference code only, so the losses below follow the paper's
  description and the design notes (``../shared/design/methods.md``), not code:
  - summary: the cosine distance ``1 - cos(a(s), t)``, averaged over the batch;
  - spatial: ``0.9 * (1 - cos)`` per location (over channels) ``+ 0.1 * smooth-L1`` per element
    (``beta = 1``, torch's default), each averaged over the batch and the teacher's grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLPAdaptor(nn.Module):
    """RADIO's MLP2 head: ``(..., in_dim) -> (..., out_dim)``."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, inner: int = 0):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, hidden))
                                    for _ in range(inner))
        self.final = nn.Sequential(nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        for block in self.blocks:
            x = x + block(x)
        return self.final(x)


class SpatialAdaptor(nn.Module):
    """The MLP at every location of a ``(B, C_s, H_s, W_s)`` map, resized to ``grid``:
    ``(B, C_t, H_t, W_t)``."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, grid: tuple[int, int], inner: int = 0):
        super().__init__()
        self.mlp = MLPAdaptor(in_channels, hidden, out_channels, inner)
        self.grid = tuple(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if tuple(x.shape[-2:]) != self.grid:
            shrink = x.shape[-2] > self.grid[0] or x.shape[-1] > self.grid[1]
            # float32: the antialiased kernel has no bf16 version on the CPU, and the losses are float32 anyway
            x = F.interpolate(x.float(), size=self.grid, mode="bilinear", align_corners=False, antialias=shrink)
        return x


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``1 - cos`` along ``dim`` (torch's ``cosine_similarity``, eps 1e-8), per remaining position."""
    return 1 - F.cosine_similarity(student.float(), teacher.float(), dim=dim, eps=1e-8)


def summary_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Batch mean of the cosine distance of the adapted summary ``(B, D)`` to the teacher's."""
    return cosine_distance(student, teacher).mean()


def spatial_loss(student: torch.Tensor, teacher: torch.Tensor, cosine_weight: float = 0.9,
                 smooth_l1_weight: float = 0.1) -> torch.Tensor:
    """``cosine_weight * mean(1 - cos over channels) + smooth_l1_weight * mean(smooth-L1)``
    of the adapted map ``(B, C, H, W)`` against the teacher's, on the teacher's grid."""
    cosine = cosine_distance(student, teacher).mean()
    l1 = F.smooth_l1_loss(student.float(), teacher.float(), reduction="mean")
    return cosine_weight * cosine + smooth_l1_weight * l1
