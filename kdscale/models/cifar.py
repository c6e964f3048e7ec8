"""CIFAR-sized (32x32 input) networks used in knowledge-distillation benchmarks.

This module provides the teacher/student architectures of the CIFAR-100
benchmark introduced with Contrastive Representation Distillation
(Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020,
a.k.a. the RepDistiller benchmark). The implementation is written from the
architecture descriptions in the original papers:

* ResNet: He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition",
  CVPR 2016 (the CIFAR variant of Sec. 4.2: 3 stages of basic blocks).
* Wide ResNet: Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016
  (pre-activation basic blocks, widths 16, 16k, 32k, 64k).

Design choices
--------------
* ResNets: 3x3 stride-1 stem convolution + BN + ReLU, then three stages
  (``layer1``..``layer3``) with strides 1/2/2, each holding ``(depth - 2) // 6``
  basic blocks (conv3x3-BN-ReLU-conv3x3-BN, add shortcut, ReLU).
  When a block changes the spatial size or the channel count, the shortcut is a
  1x1 convolution (no bias) followed by BN; otherwise it is the identity.
  ``resnet8/20/32/56/110`` use stem 16 and stage widths 16/32/64;
  ``resnet8x4/32x4`` use stem 32 and stage widths 64/128/256.
* WRNs: 3x3 stem convolution to 16 channels, three groups (``block1``..``block3``)
  of ``(depth - 4) // 6`` pre-activation blocks (BN-ReLU-conv3x3-BN-ReLU-
  [dropout]-conv3x3) with strides 1/2/2, then a final BN (``bn1``) + ReLU.
  When the channel count changes, the shortcut is a 1x1 convolution applied to
  the block's pre-activated input (as in the WRN paper); otherwise identity.
  Dropout defaults to 0. Because blocks are pre-activation, the output of
  ``block1``..``block3`` is *pre-activation* (no BN/ReLU applied yet); the
  final ``bn1``/``relu`` only follow ``block3``.
* All convolutions are bias-free; convolutions use Kaiming-normal init
  (``fan_out``, ReLU gain), BN weights are 1 and biases 0, linear biases are 0
  (linear weights keep PyTorch's default init).
* ``forward`` returns logits only. Intermediate features are meant to be read
  with forward hooks on the named sub-modules: ResNets expose ``conv1``,
  ``bn1``, ``relu``, ``layer1``, ``layer2``, ``layer3``, ``avgpool``, ``fc``, and in
  every block ``preact``, an identity on the residual sum before the block's final ReLU
  (the pre-ReLU feature that ReviewKD's code distils from, ``layer3.4.preact``; no
  parameters, nothing in the state dict; its output is then changed by the in-place ReLU,
  so a trained network's tap there is refused and a frozen teacher's tap copies it);
  WRNs expose ``conv1``, ``block1``, ``block2``, ``block3``, ``bn1``, ``relu``,
  ``avgpool``, ``fc``. Stage outputs have spatial sizes 32/16/8.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "CifarResNet", "WideResNet", "CIFAR_MODELS",
    "resnet8", "resnet20", "resnet32", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
    "wrn_16_2", "wrn_40_1", "wrn_40_2",
]  # fmt: skip


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Post-activation residual block with two 3x3 convolutions."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or c_in != c_out:
            self.downsample: nn.Module = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )
        else:
            self.downsample = nn.Identity()
        self.preact = nn.Identity()  # a tap point: the residual sum before the final ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(self.preact(y + self.downsample(x)))


class CifarResNet(nn.Module):
    """Three-stage ResNet for 32x32 inputs (He et al. 2016, Sec. 4.2)."""

    def __init__(
        self,
        depth: int,
        widths: Sequence[int] = (16, 16, 32, 64),
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"ResNet depth must be 6n+2 with n >= 1, got {depth}")
        if len(widths) != 4:
            raise ValueError("widths must be (stem, stage1, stage2, stage3)")
        n = (depth - 2) // 6
        stem, w1, w2, w3 = widths
        self.conv1 = _conv3x3(3, stem)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(stem, w1, n, stride=1)
        self.layer2 = self._stage(w1, w2, n, stride=2)
        self.layer3 = self._stage(w2, w3, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        _init_weights(self)

    @staticmethod
    def _stage(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(c_in, c_out, stride)]
        layers += [BasicBlock(c_out, c_out) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class WideBasicBlock(nn.Module):
    """Pre-activation wide residual block (Zagoruyko & Komodakis 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if c_in != c_out or stride != 1:
            self.shortcut = nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Out-of-place ReLU here: `x` itself is kept for the identity shortcut.
        act = torch.relu(self.bn1(x))
        y = self.conv1(act)
        y = self.dropout(self.relu(self.bn2(y)))
        y = self.conv2(y)
        residual = x if self.shortcut is None else self.shortcut(act)
        return y + residual


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs; stage outputs are pre-activation."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 100,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        w = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = _conv3x3(3, w[0])
        self.block1 = self._group(w[0], w[1], n, 1, dropout)
        self.block2 = self._group(w[1], w[2], n, 2, dropout)
        self.block3 = self._group(w[2], w[3], n, 2, dropout)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[3], num_classes)
        _init_weights(self)

    @staticmethod
    def _group(c_in: int, c_out: int, blocks: int, stride: int, dropout: float) -> nn.Sequential:
        layers = [WideBasicBlock(c_in, c_out, stride, dropout)]
        layers += [WideBasicBlock(c_out, c_out, 1, dropout) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_NARROW = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


def resnet8(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _NARROW, num_classes)


def resnet20(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(20, _NARROW, num_classes)


def resnet32(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _NARROW, num_classes)


def resnet56(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(56, _NARROW, num_classes)


def resnet110(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(110, _NARROW, num_classes)


def resnet8x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _X4, num_classes)


def resnet32x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _X4, num_classes)


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes)


def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes)


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes)


CIFAR_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
}
