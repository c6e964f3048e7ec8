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
import re

import torch
from torch import nn

from kdscale.checkpoints import CHECKPOINT_MARKER, network_state
from kdscale.errors import KdscaleError


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
    """The state dict named by ``spec`` (``path`` or ``path#network``).

    ``where`` names the config key (``student.weights``); a file that cannot be read is a
    one-line :class:`KdscaleError` naming the key, the file, what is wrong and the fix.
    """
    path, _, network = spec.partition("#")
    if not os.path.isfile(path):
        raise KdscaleError(f"{where}: weights file not found: {path}")
    if path.endswith(".safetensors"):
        if network:
            raise KdscaleError(f"{where}: '#{network}' selects a network of a kdscale checkpoint, not of {path}")
        return _load_safetensors(path, where)
    data = _load_torch(path, where)
    if isinstance(data, dict) and data.get(CHECKPOINT_MARKER):
        if not isinstance(data.get("model"), dict):
            raise KdscaleError(f"{where}: {path} is a kdscale checkpoint without network weights; "
                               f"point {where} at a complete checkpoint (the run directory keeps the last ones)")
        return network_state(data["model"], network or "student", f"{where} ({path})")
    if network:
        raise KdscaleError(f"{where}: '#{network}' selects a network of a kdscale checkpoint; {path} is not one")
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise KdscaleError(f"{where}: {path} holds no state_dict (a mapping of names to tensors); "
                           f"save one with torch.save(model.state_dict(), path)")
    if data and all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    return data


_FIX = "point {where} at an intact state_dict .pt, kdscale checkpoint or .safetensors file (copy or export it again)"


def _load_safetensors(path: str, where: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...
        detail = _first_line(err).removeprefix("Error while deserializing header: ")
        if _looks_like_torch(path):
            problem = f"it is a torch.save file, not safetensors: rename it to end in .pt and point {where} there"
        elif os.path.getsize(path) == 0:
            problem = f"the file is empty; {_FIX.format(where=where)}"
        else:
            problem = f"not a valid safetensors file ({detail}); {_FIX.format(where=where)}"
        raise KdscaleError(f"{where}: cannot read {path}: {problem}") from None


def _load_torch(path: str, where: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad files
        raise KdscaleError(f"{where}: cannot read {path}: {_torch_load_problem(path, err, where)}") from None


def _torch_load_problem(path: str, err: Exception, where: str) -> str:
    """Why ``torch.load`` failed on ``path``, and the fix, in words."""
    fix = _FIX.format(where=where)
    if os.path.getsize(path) == 0:
        return f"the file is empty; {fix}"
    if _looks_like_safetensors(path):
        return f"it is a safetensors file: rename it to end in .safetensors and point {where} there"
    if not _looks_like_torch(path):
        return f"not a torch.save file (neither a zip archive nor a pickle); {fix}"
    text = str(err)
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        refused = f" ({found.group(1)})" if found else ""
        return (f"it holds Python objects that kdscale does not unpickle{refused}; save only tensors, "
                f"e.g. torch.save(model.state_dict(), path), or export a .safetensors file")
    return f"a damaged or truncated torch.save file ({type(err).__name__}: {_first_line(err)}); {fix}"


def _head(path: str, size: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(size)
    except OSError:
        return b""


def _looks_like_torch(path: str) -> bool:
    """A zip archive (torch.save since 1.6) or a pickle (the legacy format) by its first bytes."""
    head = _head(path, 2)
    return head.startswith(b"PK") or head[:1] == b"\x80"


def _looks_like_safetensors(path: str) -> bool:
    """An 8-byte little-endian header length, then a JSON object."""
    head = _head(path, 9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_weights(model: nn.Module, spec: str, where: str = "weights") -> None:
    state = read_state_dict(spec, where)
    check_state_dict_matches(model, state, f"{where}={spec}")
    model.load_state_dict(state, strict=True)


def check_state_dict_matches(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    check_shapes_match({k: v.shape for k, v in model.state_dict().items()}, state, where)


def check_shapes_match(expected: dict[str, torch.Size], state: dict[str, torch.Tensor], where: str) -> None:
    """``state`` has exactly the keys of ``expected`` (a state dict's names and shapes), each of
    its shape; else one line naming the missing, unexpected and wrongly shaped keys."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(shape)}"
              for k, shape in expected.items() if k in state and state[k].shape != shape]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    raise KdscaleError(f"{where}: weights do not fit the model ({'; '.join(parts)}); "
                       f"check the model name and num_classes the weights were trained with")
