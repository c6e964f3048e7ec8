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
