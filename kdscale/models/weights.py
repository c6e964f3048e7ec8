"""Load weights into a built model, always with ``weights_only=True``.

Accepted sources:
- ``torchvision:DEFAULT`` or ``torchvision:<ENUM>`` (e.g. ``IMAGENET1K_V2``): the weight
  enums of torchvision (downloaded by torchvision, so they need internet or its cache);
- a kdscale training checkpoint, ``path.pt`` (its ``student``) or ``path.pt#<network>``;
- a ``.safetensors`` file (e.g. a kdscale export);
- a plain ``state_dict`` saved with ``torch.save`` (a ``{"state_dict": ...}`` wrapper and
  a DDP ``module.`` prefix are accepted).

A mismatch names the missing, unexpected and wrongly shaped keys.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from kdscale.errors import KdscaleError

CHECKPOINT_MARKER = "kdscale_checkpoint"


def torchvision_weights_enum(arch: str, enum_name: str, where: str):
    import torchvision

    try:
        enum_cls = torchvision.models.get_model_weights(arch)
    except ValueError:
        raise KdscaleError(f"{where}: torchvision has no pretrained weights for {arch}") from None
    if enum_name == "DEFAULT":
        return enum_cls.DEFAULT
    valid = [w.name for w in enum_cls]
    if enum_name not in valid:
        raise KdscaleError(f"{where}: {arch} has no weights {enum_name!r}; choose DEFAULT or one of {', '.join(valid)}")
    return enum_cls[enum_name]


def read_state_dict(spec: str, where: str = "weights") -> dict[str, torch.Tensor]:
    """The state dict named by ``spec`` (``path`` or ``path#network``)."""
    path, _, network = spec.partition("#")
    if not os.path.isfile(path):
        raise KdscaleError(f"{where}: weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        if network:
            raise KdscaleError(f"{where}: '#{network}' selects a network of a kdscale checkpoint, not of {path}")
        return load_file(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad files
        raise KdscaleError(f"{where}: cannot read {path} as a weights-only torch file ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if isinstance(data, dict) and data.get(CHECKPOINT_MARKER):
        return network_state_from_checkpoint(data["model"], network or "student", f"{where} ({path})")
    if network:
        raise KdscaleError(f"{where}: '#{network}' selects a network of a kdscale checkpoint; {path} is not one")
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise KdscaleError(f"{where}: {path} holds no state_dict (a mapping of names to tensors)")
    if data and all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    return data


def network_state_from_checkpoint(model_state: dict[str, torch.Tensor], network: str, where: str):
    prefix = network + "."
    state = {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}
    if not state:
        networks = sorted({k.split(".", 1)[0] for k in model_state})
        raise KdscaleError(f"{where}: checkpoint has no network {network!r}; it holds {', '.join(networks)} "
                           f"(select one with path#<network>)")
    return state


def load_weights(model: nn.Module, spec: str, where: str = "weights") -> None:
    state = read_state_dict(spec, where)
    check_state_dict_matches(model, state, f"{where}={spec}")
    model.load_state_dict(state, strict=True)


def check_state_dict_matches(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    raise KdscaleError(f"{where}: weights do not fit the model ({'; '.join(parts)}); "
                       f"check the model name and num_classes the weights were trained with")
