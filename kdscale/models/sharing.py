"""Parameters shared between two networks built separately: the stem (what runs before the
first residual stage; CTKD's two branches share it) or the trunk (the stem and every
residual stage but the last; FFL's two branches share it)."""

from __future__ import annotations

from torch import nn

from kdscale.errors import KdscaleError
from kdscale.models.features import residual_stages


def stem_names(model: nn.Module, where: str, option: str = "method.share_stem") -> list[str]:
    """Top-level children registered before the first residual stage (``conv1, bn1, relu``
    for CIFAR ResNets, ``conv1`` for WRNs, ``conv1, bn1, relu, maxpool`` for torchvision
    ResNets). Registration order is taken as execution order, as in every stock model."""
    try:
        first = residual_stages(model, where)[0].split(".")[0]
    except KdscaleError as err:
        raise KdscaleError(f"{err}; or set {option}=false") from None
    names = [name for name, _ in model.named_children()]
    if first not in names or names.index(first) == 0:
        raise KdscaleError(f"{where}: cannot tell the stem of {type(model).__name__} (no top-level module runs "
                           f"before {first!r}); set {option}=false")
    return names[:names.index(first)]


def trunk_names(model: nn.Module, where: str, option: str = "method.share_trunk") -> list[str]:
    """The stem and every residual stage but the last, as top-level children (``conv1, bn1,
    relu, layer1, layer2`` for CIFAR ResNets, ``conv1, block1, block2`` for WRNs)."""
    stages = residual_stages(model, where)
    names = [name for name, _ in model.named_children()]
    if len(stages) < 2 or any(stage not in names for stage in stages):
        raise KdscaleError(f"{where}: {type(model).__name__}'s residual stages ({', '.join(stages)}) are not "
                           f"top-level modules, so its trunk cannot be shared; set {option}=false")
    return stem_names(model, where, option) + stages[:-1]


def _parameters(model: nn.Module, modules: list[str]) -> dict[str, nn.Parameter]:
    return {f"{module}.{name}": p for module in modules for name, p in model.get_submodule(module).named_parameters()}


def _describe(params: dict[str, nn.Parameter], limit: int = 4) -> str:
    shown = [f"{name} {tuple(p.shape)}" for name, p in list(params.items())[:limit]]
    more = f", ... ({len(params)} tensors)" if len(params) > limit else ""
    return ", ".join(shown) + more if shown else "no parameters"


def _share(owner: nn.Module, other: nn.Module, mine: dict[str, nn.Parameter], theirs: dict[str, nn.Parameter],
           part: str, owner_role: str, other_role: str, option: str) -> list[str]:
    if not mine or [(k, p.shape) for k, p in mine.items()] != [(k, p.shape) for k, p in theirs.items()]:
        differ = next((f"; first difference: {k}" for k in list(mine) + list(theirs)
                       if k not in mine or k not in theirs or mine[k].shape != theirs[k].shape), "")
        raise KdscaleError(f"{option}: the {owner_role}'s {part} ({_describe(mine)}) and the {other_role}'s "
                           f"{part} ({_describe(theirs)}) differ{differ}; pick networks with the same {part} or "
                           f"set {option}=false")
    for name, param in mine.items():
        module_path, _, leaf = name.rpartition(".")
        setattr(other.get_submodule(module_path), leaf, param)
    return list(mine)


def share_stem(owner: nn.Module, other: nn.Module, owner_role: str, other_role: str) -> list[str]:
    """Make ``other``'s stem use ``owner``'s stem parameters (one set, counted, decayed and
    sharded once). Buffers (BN running statistics) stay per network. Returns the names."""
    option = "method.share_stem"
    mine = _parameters(owner, stem_names(owner, f"{owner_role} stem", option))
    theirs = _parameters(other, stem_names(other, f"{other_role} stem", option))
    return _share(owner, other, mine, theirs, "stem", owner_role, other_role, option)


def share_trunk(owner: nn.Module, other: nn.Module, owner_role: str, other_role: str) -> list[str]:
    """Make ``other``'s trunk (stem + every residual stage but the last) use ``owner``'s
    parameters: one set, counted, decayed and sharded once; its gradient is the sum of both
    branches' contributions, as for one trunk feeding two heads. Buffers (BN running
    statistics) stay per network: both copies see the same batch, so they hold the same
    values as the one trunk's would. Returns the names of the shared parameters."""
    option = "method.share_trunk"
    owner_modules = trunk_names(owner, f"{owner_role} trunk", option)
    other_modules = trunk_names(other, f"{other_role} trunk", option)
    if owner_modules != other_modules:
        raise KdscaleError(f"{option}: the {owner_role}'s trunk ({', '.join(owner_modules)}) and the {other_role}'s "
                           f"({', '.join(other_modules)}) are different modules; pick the same architecture for both "
                           f"or set {option}=false")
    mine, theirs = _parameters(owner, owner_modules), _parameters(other, other_modules)
    return _share(owner, other, mine, theirs, "trunk", owner_role, other_role, option)
