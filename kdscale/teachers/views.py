"""The frozen teacher's view of a batch, derived on the device from the student's view.

The loader produces one view: the student's crop at ``data.image_size``, normalised with
``data.mean`` / ``data.std``. A frozen teacher pretrained with other statistics or at
another resolution (a 384-px timm ConvNeXt teaching a 224-px student) gets the same crop,
un-normalised, resized to its input size and normalised with its own mean and std:

    x_t = (resize(x * std_d + mean_d) - mean_t) / std_t

so both networks see the same content (after Mixup/CutMix too: the adapter runs on the
mixed batch). Choices:
- resize: ``F.interpolate(mode="bilinear", antialias=True, align_corners=False)``, the
  tensor equivalent of PIL's bilinear resize that torchvision's ``Resize(antialias=True)``
  uses. Its weights are non-negative and sum to 1 per output pixel, so it commutes with the
  per-channel affine map; the adapter therefore resizes the normalised batch and applies
  the two normalisations as one multiply-add (``x * std_d/std_t + (mean_d - mean_t)/std_t``),
  equal to the formula above up to float rounding (checked in ``tests/models/test_timm.py``).
- in float32 outside autocast, keeping the batch's memory format (channels-last on GPU).
- the identity (same mean, std and size) returns the batch itself: no copy, no cost, the
  bits of a run without adapters.

Trainable teachers (ProKT, FFCL) and every trained network see the student's view; only a
frozen teacher (online, or in ``kdscale.teach``) has its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdscale.models.preprocessing import (
    Preprocessing,
    data_preprocessing,
    network_preprocessing,
)


class TeacherView:
    """Maps batches in the ``source`` preprocessing (the loader's) to the ``target`` one."""

    def __init__(self, source: Preprocessing, target: Preprocessing):
        self.source, self.target = source, target
        self.identity = source.same_as(target)
        self.scale = [s / t for s, t in zip(source.std, target.std)]
        self.shift = [(ms - mt) / t for ms, mt, t in zip(source.mean, target.mean, target.std)]
        self.affine = any(v != 1.0 for v in self.scale) or any(v != 0.0 for v in self.shift)
        self._constants: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _affine_tensors(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (images.device, images.dtype)
        if key not in self._constants:
            scale = torch.tensor(self.scale, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
            shift = torch.tensor(self.shift, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
            self._constants[key] = (scale, shift)
        return self._constants[key]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return images
        channels_last = images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) \
            and not images.is_contiguous()
        out = images
        if tuple(images.shape[-2:]) != self.target.input_size:
            out = F.interpolate(out.float(), size=self.target.input_size, mode="bilinear", align_corners=False,
                                antialias=True)
        if self.affine:
            scale, shift = self._affine_tensors(out)
            out = torch.addcmul(shift, out, scale)
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def describe(self) -> str:
        if self.identity:
            return "the student's view"
        t = self.target
        return (f"{t.input_size[0]}x{t.input_size[1]} px, mean {list(t.mean)}, std {list(t.std)} "
                f"(from {t.origin})")


def teacher_view(data, spec) -> TeacherView:
    """The view of the frozen teacher ``spec`` (an entry of ``cfg.teachers``) for the loader's ``data``."""
    return TeacherView(data_preprocessing(data), network_preprocessing(data, spec, "teacher"))
