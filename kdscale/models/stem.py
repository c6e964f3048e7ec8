"""The stem of a network (what runs before its first residual stage), and sharing one
stem's parameters between two networks (CTKD's two branches share the stem)."""

from __future__ import annotations

from torch import nn

from kdscale.errors import KdscaleError
from kdscale.models.features import residual_stages


def stem_names(model: nn.Module, where: str) -> list[str]:
    """Top-level children registered before the first residual stage (``conv1, bn1, relu``
    for CIFAR ResNets, ``conv1`` for WRNs, ``conv1, bn1, relu, maxpool`` for torchvision
    ResNets). Registration order is taken as execution order, as in every stock model."""
    try:
        first = residual_stages(model, where)[0].split(".")[0]
    except KdscaleError as err:
        raise KdscaleError(f"{err}; or set method.share_stem=false") from None
    names = [name for name, _ in model.named_children()]
    if first not in names or names.index(first) == 0:
        raise KdscaleError(f"{where}: cannot tell the stem of {type(model).__name__} (no top-level module runs "
                           f"before {first!r}); set method.share_stem=false")
    return names[:names.index(first)]


def _stem_parameters(model: nn.Module, where: str) -> dict[str, nn.Parameter]:
    return {f"{stem}.{name}": p for stem in stem_names(model, where)
            for name, p in model.get_submodule(stem).named_parameters()}


def _describe(params: dict[str, nn.Parameter]) -> str:
    return ", ".join(f"{name} {tuple(p.shape)}" for name, p in params.items()) or "no parameters"


def share_stem(owner: nn.Module, other: nn.Module, owner_role: str, other_role: str) -> list[str]:
    """Make ``other``'s stem use ``owner``'s stem parameters (one set, counted, decayed and
    sharded once). Buffers (BN running statistics) stay per network. Returns the names."""
    mine = _stem_parameters(owner, f"{owner_role} stem")
    theirs = _stem_parameters(other, f"{other_role} stem")
    if not mine or [(k, p.shape) for k, p in mine.items()] != [(k, p.shape) for k, p in theirs.items()]:
        raise KdscaleError(f"method.share_stem: the {owner_role}'s stem ({_describe(mine)}) and the {other_role}'s "
                           f"stem ({_describe(theirs)}) differ; pick networks with the same stem or set "
                           f"method.share_stem=false")
    for name, param in mine.items():
        module_path, _, leaf = name.rpartition(".")
        setattr(other.get_submodule(module_path), leaf, param)
    return list(mine)
