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
    """Record the outputs of named submodules during forward passes.

    A module whose output a later in-place operation changes (``ReLU(inplace=True)``,
    ``out += identity``) would hand over the changed values. With ``copy`` the hook keeps a
    copy taken as the module returns (the frozen teacher's taps: inference tensors track no
    versions); without, :meth:`pop` checks the tensor's version counter and refuses a tap
    that was changed, naming the layer (not inside a ``torch.compile`` graph, where the
    counter says nothing)."""

    def __init__(self, model: nn.Module, paths: list[str], where: str = "model", copy: bool = False):
        self.features: dict[str, torch.Tensor] = {}
        self.where, self.copy = where, copy
        self._versions: dict[str, int | None] = {}
        self._handles = []
        for path, module in check_layer_paths(model, list(paths), where).items():
            self._handles.append(module.register_forward_hook(self._recorder(path)))

    def _recorder(self, path: str):
        def hook(_module, _inputs, output):
            if self.copy:
                self.features[path] = output.clone()
                return
            self.features[path] = output
            if torch.compiler.is_compiling():  # traced into a graph: versions say nothing there
                self._versions[path] = None
                return
            try:
                self._versions[path] = output._version
            except (AttributeError, RuntimeError):  # not a tensor, or an inference tensor
                self._versions[path] = None

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        """The features of the last forward pass; the taps then forget them."""
        out, self.features = self.features, {}
        versions, self._versions = self._versions, {}
        for path, version in versions.items():
            if version is not None and path in out and out[path]._version != version:
                raise KdscaleError(f"{self.where} layer {path!r}: an in-place operation that follows it (e.g. "
                                   f"ReLU(inplace=True) or out += identity) changes its output after it is tapped, "
                                   f"so the method would read the changed values; tap another layer")
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


STAGE_NAMING = (("layer1", "layer2", "layer3", "layer4"), ("block1", "block2", "block3", "block4"),
                ("stages.0", "stages.1", "stages.2", "stages.3"))


def timm_stages(model: nn.Module) -> list[str]:
    """Stages from a timm model's ``feature_info`` (the modules ``features_only=True`` taps):
    per downsampling step (reduction >= 4, so not the stem) the last module at that
    reduction. EfficientNets give ``blocks.1, blocks.2, ...``, RegNets ``s1..s4``; a ViT,
    whose blocks all share one reduction, gives a single entry (no stages)."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, (list, tuple)):
        return []
    by_reduction: dict[int, str] = {}
    for entry in info:
        if isinstance(entry, dict) and entry.get("reduction", 0) >= 4 and entry.get("module"):
            by_reduction[entry["reduction"]] = entry["module"]
    return [by_reduction[r] for r in sorted(by_reduction)]


def residual_stages(model: nn.Module, where: str) -> list[str]:
    """Module paths of a model's residual stages, in order: ``layer1..4`` (torchvision, timm
    and CIFAR ResNets), ``block1..3`` (WRNs), ``stages.0..3`` (timm ConvNeXt and others), else
    a timm model's ``feature_info`` (:func:`timm_stages`)."""
    modules = dict(model.named_modules())
    for naming in STAGE_NAMING:
        found = [name for name in naming if name in modules]
        if len(found) >= 2:
            return found
    found = [name for name in timm_stages(model) if name in modules]
    if len(found) >= 2:
        return found
    top = [n for n in modules if n and n.count(".") == 0]
    blocks = [n for n, _ in model.get_submodule("blocks").named_children()] if "blocks" in modules else []
    fix = f"set {where} to a list of layers" if where.startswith("method.") else "list the layers explicitly"
    example = (f"; e.g. [blocks.{blocks[len(blocks) // 3]},blocks.{blocks[2 * len(blocks) // 3]},"
               f"blocks.{blocks[-1]}] (its blocks are blocks.0..{blocks[-1]})" if len(blocks) >= 3 else "")
    raise KdscaleError(f"{where}: cannot tell the residual stages of {type(model).__name__}; {fix} "
                       f"(top-level layers: {', '.join(top)}){example}")


@torch.no_grad()
def feature_shapes(model: nn.Module, paths: list[str], image_size: int, where: str,
                   frozen: bool = False) -> dict[str, torch.Size]:
    """Shapes (without the batch) of the named features for one ``image_size`` image,
    from a dry forward in eval mode (BN statistics untouched). A trained network's layer that
    an in-place operation changes is refused here, before training; a ``frozen`` teacher's
    taps copy their outputs, so any layer serves."""
    taps = FeatureTaps(model, paths, where=where, copy=frozen)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, 3, image_size, image_size, device=device))
        return {k: v.shape[1:] for k, v in taps.pop().items()}
    finally:
        model.train(was_training)
        taps.remove()
