"""``train.compile``: ``torch.compile`` of the networks themselves.

Each network is compiled in place (``nn.Module.compile``), so parameter names, checkpoints,
exports and forward hooks stay as they are. What is compiled is a network (the student, a
peer, a bridge, the frozen teacher), never the DDP or DeepSpeed wrapper and never the
whole method: compiling a whole KD task (student, teacher and loss in one graph) is what
stalled multi-node DDP in timm (pytorch-image-models issue #2693), and the loss terms are
cheap next to the networks. A ZeRO-3 partitioned teacher is not compiled (DeepSpeed swaps
its parameters in hooks); the config check says so before anything starts.
"""

from __future__ import annotations

from torch import nn


def networks_of(module: nn.Module) -> list[nn.Module]:
    """The trained networks of a method: its children that hold trainable parameters,
    looking inside ``ModuleList``/``ModuleDict`` containers (DML's peers)."""
    found = []
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            found.extend(networks_of(child))
        elif any(p.requires_grad for p in child.parameters()):
            found.append(child)
    return found


def compile_in_place(networks: list[nn.Module]) -> None:
    for network in networks:
        network.compile()


def compiles_networks(setting: str) -> bool:
    return setting in ("networks", "all")


def compiles_teacher(setting: str) -> bool:
    return setting in ("teacher", "all")
