"""A network's summary and spatial features: what a feature teacher teaches (issue 27).

Foundation-model teachers (DINOv2, CLIP, SigLIP, SAM encoders) have no classifier worth
distilling; AM-RADIO (Ranzinger et al., CVPR 2024, arXiv 2312.06709) distils their features
instead, in two kinds, which this module takes from any network kdscale builds:

- **summary**: one vector per image, ``(B, D)``: what the classifier head reads. A ViT's
  CLS token (or its pooled tokens, by the model's own ``global_pool``), a CNN's globally
  pooled last map;
- **spatial**: a map per image, ``(B, C, H, W)``: a ViT's patch tokens (prefix tokens
  dropped: CLS and registers, ``num_prefix_tokens``) reshaped to their grid, a CNN's last
  map before the global pool.

Where they are taken (choices):
- timm models: through timm's own API, ``forward_features`` then ``forward_head(...,
  pre_logits=True)`` (every timm model has both; the head's pooling and norm stay the model's
  own). The token grid is ``H / patch, W / patch`` of the input actually seen, so a ViT run at
  another size than it was built for (``dynamic_img_size``) still reshapes right.
- other networks (torchvision classifiers, kdscale's CIFAR nets): forward hooks
  (torchdistill's approach, :mod:`kdscale.models.features`): the summary is the input of the
  last ``nn.Linear`` (the classifier), flattened; the spatial map is the input of the module
  named ``avgpool`` (torchvision's ResNets, kdscale's CIFAR ResNets and WRNs). A network
  without one (torchvision's MobileNet pools in a function) names the module whose *output*
  is its map with ``spatial_layer`` (e.g. ``features``), else the error says so;
  ``summary_layer`` names the module whose *input* is the summary (its classifier).

Nothing here copies: under ``torch.inference_mode`` (frozen teachers) the tensors are
fresh outputs; a trained student's features keep their graph.
"""

from __future__ import annotations

import torch
from torch import nn

from kdscale.errors import KdscaleError

TARGETS = ("summary", "spatial")


def _is_timm(model: nn.Module) -> bool:
    return hasattr(model, "forward_features") and hasattr(model, "forward_head")


def _last_linear(model: nn.Module) -> str | None:
    return next((name for name, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear)), None)


class FeatureTargets:
    """``FeatureTargets(model, ["summary", "spatial"], where="teachers[1]")`` then
    ``targets(images) -> (logits, {"summary": (B, D), "spatial": (B, C, H, W)})`` with only the
    asked kinds; ``logits`` too when ``logits=True`` (else None). ``where`` names the network
    in errors (``teachers[1]``, ``student``)."""

    def __init__(self, model: nn.Module, targets, where: str, spatial_layer: str | None = None,
                 summary_layer: str | None = None, logits: bool = False):
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets:
            raise KdscaleError(f"{where}.targets: {unknown or 'nothing'} is not a list of {', '.join(TARGETS)}")
        self.model, self.targets, self.where, self.logits = model, tuple(targets), where, logits
        self.timm = _is_timm(model) and spatial_layer is None and summary_layer is None
        self.call = model
        """What runs the model (a ZeRO-3 teacher's DeepSpeed engine: set by its owner)."""
        self._seen: dict[str, torch.Tensor] = {}
        self._handles = []
        if self.timm:
            return
        modules = dict(model.named_modules())
        # (module, whether the target is its input): the classifier's input; the pool's input
        # or the named module's output.
        layers = {"summary": (summary_layer or _last_linear(model), True),
                  "spatial": (spatial_layer, False) if spatial_layer else
                  ("avgpool" if "avgpool" in modules else None, True)}
        for kind in self.targets:
            layer, is_input = layers[kind]
            if layer is None or layer not in modules:
                key = f"{where}.{kind}_layer"
                found = f"no module {layer!r}" if layer else \
                    ("no nn.Linear classifier" if kind == "summary" else "no module named avgpool")
                which = "whose input they are (its classifier" if kind == "summary" else \
                    "whose output is the map (e.g. features"
                raise KdscaleError(f"{where}: {type(model).__name__} has {found} to take its {kind} features "
                                   f"from; set {key} to the module {which})")
            module = modules[layer]
            self._handles.append(module.register_forward_pre_hook(self._recorder(kind)) if is_input else
                                 module.register_forward_hook(self._recorder(kind, output=True)))

    def _recorder(self, kind: str, output: bool = False):
        def hook(_module, inputs, result=None):
            self._seen[kind] = result if output else inputs[0]
        return hook

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        if self.timm:
            return self._timm(images)
        self._seen.clear()
        logits = self.call(images)
        out = {}
        for kind in self.targets:
            if kind not in self._seen:
                raise KdscaleError(f"{self.where}: its {kind} layer did not run in the forward pass")
            value = self._seen.pop(kind)
            out[kind] = value.flatten(1) if kind == "summary" else value
        return (logits if self.logits else None), out

    def _timm(self, images: torch.Tensor):
        # Through the model's own call, its forward swapped for this one call: the hooks on the
        # model itself run (ZeRO-3 gathers a ViT's own cls_token and pos_embed in them).
        self.model.forward = self._timm_forward
        try:
            return self.call(images)
        finally:
            del self.model.forward

    def _timm_forward(self, images: torch.Tensor):
        features = self.model.forward_features(images)
        out = {}
        if "summary" in self.targets:
            out["summary"] = self.model.forward_head(features, pre_logits=True)
        if "spatial" in self.targets:
            out["spatial"] = self._grid(features, images.shape[-2:])
        return (self.model.forward_head(features) if self.logits else None), out

    def _grid(self, features: torch.Tensor, size) -> torch.Tensor:
        if features.dim() == 4:  # a CNN's map (NCHW; timm's NHWC models say so below)
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC":
                return features.permute(0, 3, 1, 2)
            return features
        if features.dim() != 3:
            raise KdscaleError(f"{self.where}: forward_features gave shape {tuple(features.shape)}, neither tokens "
                               f"(B, N, D) nor a map (B, C, H, W)")
        prefix = getattr(self.model, "num_prefix_tokens", 0)
        patch = getattr(getattr(self.model, "patch_embed", None), "patch_size", None)
        if patch is None:
            raise KdscaleError(f"{self.where}: {type(self.model).__name__} gives tokens without a patch_embed.patch_size "
                               f"to lay them on a grid; set {self.where}.spatial_layer")
        rows, cols = size[0] // patch[0], size[1] // patch[1]
        tokens = features[:, prefix:]
        if tokens.shape[1] != rows * cols:
            raise KdscaleError(f"{self.where}: {tokens.shape[1]} patch tokens do not fill a {rows}x{cols} grid "
                               f"(input {size[0]}x{size[1]} px, patch {patch[0]}x{patch[1]})")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], rows, cols)

    def shapes(self, input_size: tuple[int, int], device: torch.device | None = None) -> dict[str, tuple[int, ...]]:
        """Each target's shape per image, found by a dry forward of one image (eval mode, no
        gradient): the adaptor heads are sized from it."""
        was_training = self.model.training
        self.model.eval()
        device = device or next(self.model.parameters()).device
        try:
            with torch.no_grad():
                _, out = self(torch.zeros(1, 3, *input_size, device=device))
        finally:
            self.model.train(was_training)
        return {kind: tuple(value.shape[1:]) for kind, value in out.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
