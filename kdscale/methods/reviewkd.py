"""``reviewkd``: Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021
(code: github dvlab-research/ReviewKD; also megvii-research/mdistiller).

The student's stage features ``F_S^1..F_S^n`` (shallow to deep, the last being the pooled
features as a 1x1 map) go through a chain of trainable attention-based fusion (ABF) modules
from the deepest to the shallowest; each output regresses the teacher's feature at the same
position with the hierarchical context loss (HCL)::

    r_n, o_n = ABF_n(F_S^n)                    (no fusion at the deepest level)
    r_i, o_i = ABF_i(F_S^i, r_{i+1})           i = n-1 .. 1
    ABF_i(x, r):  x = BN(conv1x1(x))           (to ``mid`` channels)
                  r = nearest-resize(r, size of x)
                  a = sigmoid(conv1x1([x, r]))   (2 maps, conv with bias)
                  x = x * a_0 + r * a_1
                  x = nearest-resize(x, size of F_T^i)  (only where the sizes differ)
                  return x (the residual r_i for the next level), BN(conv3x3(x)) (o_i, the teacher's channels)
    HCL(o, F_T) = (mse(o, F_T) + sum_k w_k mse(pool_k(o), pool_k(F_T))) / (1 + sum_k w_k)
                  pool_k = adaptive average pooling to k x k, k in (4, 2, 1) with k < H,
                  w = 1/2, 1/4, 1/8 for the levels used, in that order; mse averaged over every element
    ce     = ce_weight * CE(z_S, y)
    review = review_weight * min(1, epoch / warmup_epochs) * sum_i HCL(o_i, sg(F_T^i))

Verified (ReviewKD ``CIFAR-100/model/reviewkd.py``, ``CIFAR-100/train.py``,
``CIFAR-100/script/reviewKD.sh``, ``ImageNet/models/reviewkd.py``, ``ImageNet/imagenet_amp.py``;
mdistiller ``mdistiller/distillers/ReviewKD.py``, ``mdistiller/engine/cfg.py``,
``configs/cifar100/reviewkd.yaml``, ``configs/imagenet/r34_r18/reviewkd.yaml``):
- ABF as above: bias-free 1x1 conv + BN to ``mid``; fusion conv ``2 mid -> 2`` with bias and a
  sigmoid; bias-free 3x3 conv (pad 1) + BN to the teacher's channels; ``kaiming_uniform_(a=1)``
  on both bias-free convs, PyTorch's defaults elsewhere; nearest resizes. The residual passed on
  is the fused map after its resize to the teacher's size, as in the code.
- ``mid = min(512, channels of the deepest student feature)`` (``mid_channels: 0``): 256 for
  resnet8x4, 128 for wrn_16_2, 64 for resnet20, 512 for ResNet-18 (the ImageNet code's explicit
  512; its MobileNet student uses 256: set ``mid_channels``).
- HCL exactly as ``hcl``/``hcl_loss``, summed over the levels; CE weight 1; weight
  ``--kd-loss-weight`` (default 1, ``reviewKD.sh``: 5 for resnet32x4 -> resnet8x4 and the
  wrn-40-2 pairs, 0.6 resnet56 -> resnet20, 1 resnet110 -> resnet32); warm-up
  ``min(1, epoch / 20)`` with the 0-based epoch of ``train.py`` (the first epoch at weight 0;
  mdistiller counts epochs from 1, one epoch ahead). The term stays in the graph at weight 0.
  The ImageNet code has no warm-up (``warmup_epochs: 0``) and weight 1.
- Levels: the residual stages' outputs and the pooled features, both networks, paired by
  position (CIFAR ResNets ``layer1..3`` + ``avgpool``, WRNs ``block1..3`` + ``avgpool``, ResNet-18
  ``layer1..4`` + ``avgpool``: the code's ``in_channels`` lists); ``student_layers`` /
  ``teacher_layers`` name others (shallow to deep; a vector output is a 1x1 map).
- ``kd_weight > 0``: the CIFAR code's ``--use-kl``, ``T^2 KL(p_T^T || p_S^T)`` batch mean, T=4.

Which features (verified: the authors' CIFAR ``train.py`` and ``model/resnet_cifar.py``,
``preact=True`` for the teacher): the student's are its stage outputs (post-ReLU for ResNets,
pre-activation for WRNs, as in the code); the **teacher's default to the code's pre-ReLU
features** where kdscale's own CIFAR networks make them module outputs (the frozen teacher's
taps copy each output as the module returns it, before the in-place ReLU that follows):
- kdscale's CIFAR ResNets: each stage's residual sum before its last ReLU, the last block's
  ``preact`` identity (``layer1.2.preact, layer2.2.preact, layer3.2.preact`` for resnet20),
  so the student regresses negative values too, as in the code;
- kdscale's WRNs: ``block2.0.bn1, block3.0.bn1, bn1`` (each group's output after the next
  block's BN, before its ReLU, as the code's ``preact`` features);
- then the pooled features, as in the code.
torchvision and timm ResNets have no module whose output is the pre-ReLU sum (torchvision's
``BasicBlock`` adds and applies ``relu``, a module it also calls after ``bn1``; in timm's
blocks the sum is the *input* of ``act2``, and kdscale taps outputs), so their teachers default to the post-ReLU stage outputs
(``layer1..4``) and the pooled features; the ImageNet code distils pre-ReLU sums for both
networks, which kdscale cannot tap there without rewriting the forward. ``teacher_layers``
names any other layers (``[layer1,layer2,layer3,avgpool]`` gives the post-ReLU outputs on
CIFAR ResNets too).
Other differences: the authors' CIFAR ``train.py`` never calls ``teacher.eval()`` (its
teacher's BN uses batch statistics); kdscale's frozen teacher is in eval mode, as in mdistiller
and the ImageNet code. The paper's text was not re-read for this port; the code is the form
(no paper option).

Options, inferred: ``abf_bn: false`` replaces the ABF's BNs by identities (not in the code: for
checks where per-rank batch statistics must not matter, e.g. 2 ranks = 1 rank).

The ABFs are children (``self.abfs``): trained, sharded under ZeRO, checkpointed; the export
(``export/student.safetensors``) holds the student alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kdscale.errors import KdscaleError
from kdscale.methods.base import register_method
from kdscale.methods.feature_distiller import FeatureDistiller
from kdscale.methods.layer_pairs import last_stage, penultimate_layer
from kdscale.models.cifar import CifarResNet, WideResNet
from kdscale.models.features import residual_stages

HCL_LEVELS = (4, 2, 1)


def hierarchical_context_loss(student_maps, teacher_maps, levels=HCL_LEVELS) -> torch.Tensor:
    """ReviewKD's HCL summed over the paired maps (see the module docstring), in float32; the
    teacher side is detached."""
    total = student_maps[0].new_zeros((), dtype=torch.float32)
    for fs, ft in zip(student_maps, teacher_maps, strict=True):
        fs, ft = fs.float(), ft.detach().float()
        loss, weight, weights = F.mse_loss(fs, ft), 1.0, 1.0
        for level in levels:
            if level >= fs.shape[2]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
            weights += weight
        total = total + loss / weights
    return total


class ABF(nn.Module):
    """Attention-based fusion of one level: student channels -> ``mid`` (fused with the deeper
    level's residual unless ``fuse`` is false) -> the teacher's channels."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool, bn: bool = True):
        super().__init__()
        norm = nn.BatchNorm2d if bn else (lambda _channels: nn.Identity())
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False), norm(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                   norm(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, residual=None, out_size=None):
        """``(output at the teacher's size and channels, residual for the next level)``."""
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def review_layers(model: nn.Module, image_size: int, where: str) -> list[str]:
    """The residual stages and the pooled (penultimate) features, shallow to deep."""
    return residual_stages(model, where) + [penultimate_layer(model, image_size, where)]


def code_teacher_layers(model: nn.Module, image_size: int, where: str) -> list[str]:
    """The teacher features of the authors' CIFAR code (``preact=True``) where kdscale's own
    CIFAR networks make them module outputs: a ResNet's residual sum before the last ReLU of
    each stage (the last block's ``preact`` tap), a WRN's group output after the next block's
    BN (``block2.0.bn1``, ``block3.0.bn1``, the final ``bn1``), then the pooled features.
    Other networks: :func:`review_layers`."""
    if isinstance(model, CifarResNet):
        stages = residual_stages(model, where)
        return [f"{stage}.{len(model.get_submodule(stage)) - 1}.preact" for stage in stages] + \
            [penultimate_layer(model, image_size, where)]
    if isinstance(model, WideResNet):
        return ["block2.0.bn1", "block3.0.bn1", "bn1", penultimate_layer(model, image_size, where)]
    return review_layers(model, image_size, where)


def as_map(feature: torch.Tensor) -> torch.Tensor:
    """A pooled vector ``(B, C)`` as the 1x1 map ``(B, C, 1, 1)``; maps unchanged."""
    return feature.reshape(*feature.shape, 1, 1) if feature.dim() == 2 else feature


def _map_shapes(layers, shapes, key) -> list[tuple[int, int, int]]:
    out = []
    for layer in layers:
        shape = tuple(shapes[layer])
        if len(shape) not in (1, 3):
            raise KdscaleError(f"{key}: ReviewKD fuses feature maps (C, H, W) or pooled vectors (C,); layer "
                               f"{layer!r} gives shape {shape}; pick layers whose outputs are maps")
        out.append(shape if len(shape) == 3 else (shape[0], 1, 1))
    return out


@register_method
class ReviewKD(FeatureDistiller):
    name = "reviewkd"
    paper = "Chen et al. 2021, knowledge review (ReviewKD)"
    description = ("Knowledge review: trained attention-based fusion of the student's stages, deepest first, "
                   "regresses every teacher stage (hierarchical context loss).")
    default_layer = staticmethod(last_stage)  # not used: the layer lists are filled in first
    single_layer = False

    @dataclass
    class Params:
        ce_weight: float = field(default=1.0, metadata={"ge": 0})
        review_weight: float = field(default=1.0, metadata={"ge": 0})
        warmup_epochs: float = field(default=20.0, metadata={"ge": 0})
        mid_channels: int = field(default=0, metadata={"ge": 0})
        abf_bn: bool = True
        kd_weight: float = field(default=0.0, metadata={"ge": 0})
        temperature: float = field(default=4.0, metadata={"gt": 0})
        student_layers: list[str] = field(default_factory=list)
        teacher_layers: list[str] = field(default_factory=list)

    def __init__(self, student, params, context):
        size = context.image_size
        params = dataclasses.replace(  # empty lists: every stage and the pooled features
            params, student_layers=list(params.student_layers) or review_layers(student, size, "method.student_layers"),
            teacher_layers=list(params.teacher_layers) or code_teacher_layers(context.frozen_teacher, size,
                                                                              "method.teacher_layers"))
        super().__init__(student, params, context)
        s_shapes = _map_shapes(self.features.student_layers, self.features.student_shapes, "method.student_layers")
        t_shapes = _map_shapes(self.features.teacher_layers, self.features.teacher_shapes, "method.teacher_layers")
        mid = params.mid_channels or min(512, s_shapes[-1][0])
        self.abfs = nn.ModuleList(ABF(s[0], mid, t[0], fuse=i < len(s_shapes) - 1, bn=params.abf_bn)
                                  for i, (s, t) in enumerate(zip(s_shapes, t_shapes)))

    def review(self, student_maps, teacher_sizes) -> list[torch.Tensor]:
        """The ABF chain, deepest level first; outputs in the levels' order (shallow to deep)."""
        outputs, residual = [], None
        for i in reversed(range(len(self.abfs))):
            out, residual = self.abfs[i](student_maps[i], residual, teacher_sizes[i])
            outputs.insert(0, out)
        return outputs

    def warmup_factor(self) -> float:
        """``min(1, epoch / warmup_epochs)`` on the 0-based epoch; 1 without warm-up."""
        warmup = self.params.warmup_epochs
        return min(1.0, self.epoch / warmup) if warmup > 0 else 1.0

    def feature_terms(self, pairs):
        teacher_maps = [as_map(ft) for _, ft in pairs]
        outputs = self.review([as_map(fs) for fs, _ in pairs], [tuple(t.shape[-2:]) for t in teacher_maps])
        weight = self.params.review_weight * self.warmup_factor()
        return {"review": weight * hierarchical_context_loss(outputs, teacher_maps)}
