"""Which layers a feature method reads, and their pairing: the default layers
(:func:`penultimate_layer`, :func:`second_stage`, :func:`last_stage`) and
:class:`FeaturePairs`, the student's taps and the teacher's paths, paired by position.

Penultimate features are the input of a network's last ``nn.Linear``. kdscale taps the
**output of the module that runs just before it** (a forward hook; ``avgpool`` in the CIFAR
and torchvision ResNets and WRNs, ``global_pool`` in timm's), flattened: the frozen
teacher's features reach a method only through forward hooks on module outputs
(``TeacherNeeds.features``), and the student is tapped the same way. The module is found by
a dry forward in which its flattened output must equal, exactly, what a forward pre-hook on
the last ``nn.Linear`` receives; otherwise the method asks for the layer by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kdscale.errors import KdscaleError
from kdscale.models.features import FeatureTaps, feature_shapes, residual_stages


def penultimate_layer(model: nn.Module, image_size: int, where: str) -> str:
    """Path of the module whose output, flattened, is the input of ``model``'s last
    ``nn.Linear`` (see the module docstring)."""
    modules = dict(model.named_modules())
    linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise KdscaleError(f"{where}: {type(model).__name__} has no nn.Linear, so no penultimate features; name "
                           f"the layer to use")
    head = linears[-1]
    ancestors = {head.rsplit(".", i)[0] for i in range(1, head.count(".") + 1)} | {""}
    last: list = [None]
    found: list = []

    def record(name):
        def hook(_module, _inputs, output):
            last[0] = (name, output)
        return hook

    def check(_module, inputs):
        if last[0] is not None and torch.is_tensor(last[0][1]) and torch.is_tensor(inputs[0]):
            name, out = last[0]
            if out.shape[0] == inputs[0].shape[0] and torch.equal(out.reshape(len(out), -1),
                                                                  inputs[0].reshape(len(out), -1)):
                found.append(name)

    handles = [m.register_forward_hook(record(n)) for n, m in modules.items() if n not in ancestors and n != head]
    handles.append(modules[head].register_forward_pre_hook(check))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if not found:
        raise KdscaleError(f"{where}: cannot tell which module of {type(model).__name__} feeds its last linear layer "
                           f"{head!r} (a function runs in between); name the layer to use")
    return found[-1]


def second_stage(model: nn.Module, image_size: int, where: str) -> str:
    return residual_stages(model, where)[1]


def last_stage(model: nn.Module, image_size: int, where: str) -> str:
    return residual_stages(model, where)[-1]


DefaultLayer = Callable[[nn.Module, int, str], str]


class FeaturePairs:
    """Paired student and teacher layers of a feature method: the student tapped with
    forward hooks, the teacher's paths for :meth:`Distiller.teacher_needs`, each layer's
    shape from a dry forward (a wrong name fails when the method is built). Empty lists
    take ``default`` on each network; the keys in errors are ``method.student_<key>`` and
    ``method.teacher_<key>``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layers: list[str],
                 teacher_layers: list[str], image_size: int, default: DefaultLayer, key: str = "layers"):
        s_key, t_key = f"method.student_{key}", f"method.teacher_{key}"
        self.student_layers = list(student_layers) or [default(student, image_size, s_key)]
        self.teacher_layers = list(teacher_layers) or [default(teacher, image_size, t_key)]
        if len(self.student_layers) != len(self.teacher_layers):
            raise KdscaleError(f"{s_key} {self.student_layers} and {t_key} {self.teacher_layers} pair up by position "
                               f"and must have the same length")
        self.student_shapes = feature_shapes(student, self.student_layers, image_size, where=f"{s_key} (student)")
        self.teacher_shapes = feature_shapes(teacher, self.teacher_layers, image_size, where=f"{t_key} (teacher)",
                                             frozen=True)
        self.taps = FeatureTaps(student, self.student_layers, where="student")

    def pairs(self, teacher_features: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(student, detached teacher)`` features of the student's last forward, paired."""
        features = self.taps.pop()
        return [(features[s], teacher_features[t].detach()) for s, t in zip(self.student_layers, self.teacher_layers)]
