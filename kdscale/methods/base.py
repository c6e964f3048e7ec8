"""The Distiller contract shared by every method, and the method registry.

Adapted in spirit from mdistiller's ``Distiller``: a method is an ``nn.Module`` that owns
its *trainable* networks as children (the student, and e.g. a scratch teacher or a
bridge module) and computes named loss terms. Frozen teachers live outside it (see
:mod:`kdscale.train.teachers`), so no optimizer, DDP bucket or ZeRO partition ever holds
their parameters; the method only receives their outputs.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from kdscale.errors import KdscaleError


@dataclass
class TeacherOutput:
    """What a frozen teacher produced for one batch: logits and tapped features."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class NoParams:
    """A method without parameters of its own."""


class Distiller(nn.Module):
    """Base class of every method.

    Subclasses set the class attributes, implement :meth:`forward_train`, and put every
    trainable network in ``self`` as a child module. The total loss is the sum of the
    returned terms; each term is logged as ``train/loss_<term>``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    requires_teacher: ClassVar[bool] = False
    teacher_outputs: ClassVar[tuple[str, ...]] = ()
    """What the method reads from the frozen teacher: ``logits`` and/or ``features``."""
    trainable_networks: ClassVar[tuple[str, ...]] = ("student",)
    """Names of the child networks the method trains (for ``kdscale methods``)."""

    def __init__(self, student: nn.Module, params, teacher=None, label_smoothing: float = 0.0):
        super().__init__()
        self.student = student
        self.params = params
        self.label_smoothing = label_smoothing

    # -- the contract ---------------------------------------------------------------
    def forward_train(self, images: torch.Tensor, targets: torch.Tensor,
                      teacher_output: TeacherOutput | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def forward_test(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)

    def evaluated_networks(self) -> dict[str, nn.Module]:
        """Every trainable network scored in evaluation, as ``val/<name>_top1``."""
        return {"student": self.student}

    def teacher_feature_layers(self) -> list[str]:
        """Module paths of the frozen teacher whose outputs the method needs."""
        return []

    # -- plumbing -------------------------------------------------------------------
    def forward(self, images, targets=None, teacher_output=None):
        if self.training:
            return self.forward_train(images, targets, teacher_output)
        return self.forward_test(images)


METHODS: dict[str, type[Distiller]] = {}


def register_method(cls: type[Distiller]) -> type[Distiller]:
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method class {cls.__name__} needs a unique name, got {cls.name!r}")
    if not dataclasses.is_dataclass(cls.Params):
        raise ValueError(f"{cls.__name__}.Params must be a dataclass")
    METHODS[cls.name] = cls
    return cls


def get_method_class(name: str, where: str = "method.name") -> type[Distiller]:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise KdscaleError(f"{where}: unknown method {name!r}; {hint}known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]
