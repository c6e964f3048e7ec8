"""Build any supported classifier by name.

Names:
- ``torchvision:<name>``: any torchvision classification model (``torchvision:resnet50``);
- ``timm:<name>``: any timm model, optionally with its pretrained tag (``timm:convnext_tiny``,
  ``timm:resnet50.a1_in1k``; :mod:`kdscale.models.timm_models`);
- a CIFAR net of the KD literature, bare or with ``cifar:`` (``resnet8x4``, ``cifar:wrn_40_2``).

Models are stock modules; features are read with forward hooks
(:mod:`kdscale.models.features`), never by rewriting a model.
"""

from __future__ import annotations

import difflib

from torch import nn

from kdscale.errors import KdscaleError
from kdscale.models.cifar import CIFAR_MODELS
from kdscale.models.preprocessing import TIMM_PREFIX, TORCHVISION_PREFIX
from kdscale.models.timm_models import build_timm
from kdscale.models.weights import load_weights, torchvision_weights_enum

HUB_PREFIXES = (TORCHVISION_PREFIX, TIMM_PREFIX)


def torchvision_classification_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def known_model_names() -> list[str]:
    return sorted(CIFAR_MODELS) + [TORCHVISION_PREFIX + n for n in torchvision_classification_models()]


def build_model(name: str, num_classes: int, weights: str | None = None, where: str = "student",
                timm_options: dict | None = None) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs and load ``weights`` (see
    :func:`kdscale.models.weights.load_weights` for the accepted forms); ``timm_options``: more
    keyword arguments for ``timm.create_model``."""
    if not name:
        raise KdscaleError(f"{where}.name is empty: set it to a model, e.g. resnet8x4 or torchvision:resnet18")
    if timm_options and not name.startswith(TIMM_PREFIX):
        raise KdscaleError(f"{where}.timm_options applies to timm: models only; {name!r} is not one (remove it)")
    hub = next((p for p in HUB_PREFIXES if weights and weights.startswith(p)), None)
    family = next((p for p in HUB_PREFIXES if name.startswith(p)), None)
    if hub and hub != family:
        raise KdscaleError(f"{where}.weights={weights!r}: {hub[:-1]} weights exist only for {hub}* models; "
                           f"point {where}.weights at a file or unset it")
    if name.startswith(TORCHVISION_PREFIX):
        model = _build_torchvision(name[len(TORCHVISION_PREFIX):], num_classes, weights, where)
    elif name.startswith(TIMM_PREFIX):
        model = build_timm(name[len(TIMM_PREFIX):], num_classes, weights, where, timm_options)
    else:
        bare = name[len("cifar:"):] if name.startswith("cifar:") else name
        if bare not in CIFAR_MODELS:
            raise KdscaleError(_unknown_model_message(name, where))
        model = CIFAR_MODELS[bare](num_classes=num_classes)
    if weights and not hub:
        load_weights(model, weights, where=f"{where}.weights")
    return model


def _build_torchvision(arch: str, num_classes: int, weights: str | None, where: str) -> nn.Module:
    import torchvision

    if arch not in torchvision_classification_models():
        raise KdscaleError(_unknown_model_message(TORCHVISION_PREFIX + arch, where))
    if weights and weights.startswith(TORCHVISION_PREFIX):
        enum = torchvision_weights_enum(arch, weights[len(TORCHVISION_PREFIX):], where=f"{where}.weights")
        categories = len(enum.meta.get("categories", [])) or num_classes
        if categories != num_classes:
            raise KdscaleError(
                f"{where}: weights {enum} have {categories} classes but {where} is built with {num_classes}; "
                f"set {where}.num_classes={categories} or use a dataset with {categories} classes")
        try:
            return torchvision.models.get_model(arch, weights=enum)
        except Exception as err:  # noqa: BLE001 - network errors come in many types
            raise KdscaleError(
                f"{where}.weights={weights}: could not download {enum} ({type(err).__name__}: {err}); "
                f"on a machine without internet, point {where}.weights at a local .pt/.safetensors file") from None
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def _unknown_model_message(name: str, where: str) -> str:
    import timm

    close = difflib.get_close_matches(name, known_model_names(), n=3, cutoff=0.6)
    if timm.is_model(name):
        close = close[:2] + [TIMM_PREFIX + name]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return (f"{where}.name: unknown model {name!r}; {hint}CIFAR nets: {', '.join(sorted(CIFAR_MODELS))}; "
            f"any torchvision classifier as torchvision:<name> (e.g. torchvision:resnet18); "
            f"or any timm model as timm:<name> (e.g. timm:convnext_tiny)")
