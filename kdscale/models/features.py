"""Forward hooks that tap intermediate features by module path (torchdistill's approach).

``FeatureTaps(model, ["layer3"])`` records the output of ``model.layer3`` on every
forward; the model itself is untouched, so any torchvision or CIFAR net can be tapped.
"""

from __future__ import annotations

import torch
from torch import nn

from kdscale.errors import KdscaleError


def check_layer_paths(model: nn.Module, paths: list[str], where: str) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    found = {}
    for path in paths:
        if path not in modules or path == "":
            top = [n for n in modules if n and n.count(".") == 0]
            raise KdscaleError(f"{where}: {type(model).__name__} has no layer {path!r}; "
                               f"valid top-level layers: {', '.join(top)} (nested ones as a.b.c)")
        found[path] = modules[path]
    return found


class FeatureTaps:
    """Record the outputs of named submodules during forward passes."""

    def __init__(self, model: nn.Module, paths: list[str], where: str = "model"):
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        for path, module in check_layer_paths(model, list(paths), where).items():
            self._handles.append(module.register_forward_hook(self._recorder(path)))

    def _recorder(self, path: str):
        def hook(_module, _inputs, output):
            self.features[path] = output

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        """The features of the last forward pass; the taps then forget them."""
        out, self.features = self.features, {}
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


STAGE_NAMING = (("layer1", "layer2", "layer3", "layer4"), ("block1", "block2", "block3", "block4"),
                ("stages.0", "stages.1", "stages.2", "stages.3"))


def residual_stages(model: nn.Module, where: str) -> list[str]:
    """Module paths of a model's residual stages, in order: ``layer1..4`` (torchvision and
    CIFAR ResNets), ``block1..3`` (WRNs) or ``stages.0..3`` (timm-style)."""
    modules = dict(model.named_modules())
    for naming in STAGE_NAMING:
        found = [name for name in naming if name in modules]
        if len(found) >= 2:
            return found
    top = [n for n in modules if n and n.count(".") == 0]
    raise KdscaleError(f"{where}: cannot tell the residual stages of {type(model).__name__}; list the layers "
                       f"explicitly (top-level layers: {', '.join(top)})")


@torch.no_grad()
def feature_shapes(model: nn.Module, paths: list[str], image_size: int, where: str) -> dict[str, torch.Size]:
    """Shapes (without the batch) of the named features for one ``image_size`` image,
    from a dry forward in eval mode (BN statistics untouched)."""
    taps = FeatureTaps(model, paths, where=where)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, 3, image_size, image_size, device=device))
        return {k: v.shape[1:] for k, v in taps.pop().items()}
    finally:
        model.train(was_training)
        taps.remove()
