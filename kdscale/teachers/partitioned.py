"""A frozen teacher built already partitioned (``distributed.teacher_sharding=zero3``).

Built whole and then handed to DeepSpeed, a teacher that fits only when partitioned would run
out of memory on every rank before DeepSpeed partitions it. Here it is constructed under
``deepspeed.zero.Init``: each submodule's parameters are partitioned across the ranks as soon
as its constructor returns, so a rank never holds more than one submodule's parameters whole.
Its weights are then copied in one submodule at a time (``GatheredParameters`` with rank 0 as
the writer: the submodule is gathered, rank 0 copies the weights in, and leaving the context
partitions the result again on every rank).

Where the weights come from (:func:`host_weights`):
- a file: read on the host by every rank (host memory, freed once loaded);
- hub weights (``torchvision:``/``timm:``): the hub's own loader builds the network whole on
  the host once (host memory, never the GPU) and its state dict is loaded as above.

Methods that read the teacher's structure or feature shapes when they are built (FitNet's
regressor, SOKD's bridge, ...) get a *shape twin*: the same network on the ``meta`` device,
which holds no memory and answers dry forwards with shapes (:func:`shape_twin`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kdscale.models import build_model
from kdscale.models.registry import HUB_PREFIXES
from kdscale.models.weights import check_shapes_match, read_state_dict
from kdscale.parallel.context import init_deepspeed_comm


def shape_twin(build: Callable[[], nn.Module]) -> nn.Module:
    """The network ``build`` makes, on the ``meta`` device: structure and shapes, no memory."""
    with torch.device("meta"):
        return build()


def host_weights(name: str, num_classes: int, weights: str | None, where: str,
                 timm_options: dict | None = None) -> dict[str, torch.Tensor] | None:
    """The teacher's weights as a state dict on the host (None: no weights, random init)."""
    if not weights:
        return None
    if weights.startswith(HUB_PREFIXES):
        return build_model(name, num_classes, weights, where=where, timm_options=timm_options).state_dict()
    return read_state_dict(weights, where=f"{where}.weights")


def build_partitioned(build: Callable[[], nn.Module], state: dict[str, torch.Tensor] | None, ds_config: dict,
                      where: str, device: torch.device) -> nn.Module:
    """``build()`` under ``deepspeed.zero.Init(ds_config)``, then ``state`` loaded into it one
    submodule at a time. Every rank of the process group must call it (collectives)."""
    import deepspeed
    import torch.distributed as dist

    init_deepspeed_comm(device)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = build()
    if state is None:
        return model
    shapes = {k: getattr(v, "ds_shape", v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    check_shapes_match(shapes, state, where)
    writer = dist.get_rank() == 0
    for prefix, module in model.named_modules():
        key = (prefix + ".") if prefix else ""
        params = list(module.named_parameters(recurse=False))
        if params:
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
                if writer:
                    with torch.no_grad():
                        for name, param in params:
                            param.copy_(state[key + name])
        for name, buffer in module.named_buffers(recurse=False):
            if key + name in state:  # non-persistent buffers are not in a state dict
                buffer.data.copy_(state[key + name])
    return model


def is_partitioned(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are ZeRO-3 partitions (built under ``zero.Init``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())
