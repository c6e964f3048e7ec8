"""The Distiller contract shared by every method, and the method registry.

Adapted in spirit from mdistiller's ``Distiller``: a method is an ``nn.Module`` that owns
its *trainable* networks as children (the student, and e.g. a scratch teacher or a
bridge module) and computes named loss terms. Frozen teachers live outside it (see
:mod:`kdscale.runtime.teachers`), so no optimizer, DDP bucket or ZeRO partition ever holds
their parameters; the method only receives their outputs.

A method says how it uses the ``teacher`` section of the config (``teacher_role``):
- ``frozen``: a pre-trained teacher run outside the method (KD, AT, CTKD's expert, SOKD);
- ``trainable``: the method owns and trains the teacher network (ProKT, FFCL);
- ``none``: no teacher (vanilla, DML).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

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


@dataclass
class MethodContext:
    """What a method may use to build itself."""

    num_classes: int
    image_size: int
    student_name: str = ""
    teacher_name: str = ""
    label_smoothing: float = 0.0
    teacher: nn.Module | None = None
    teacher_pretrained: bool = False
    """Whether ``teacher`` was loaded from ``teacher.weights``."""
    """The frozen teacher (read-only, for shapes and architecture), or the trainable
    teacher the method must own, by ``teacher_role``."""
    build_model: Callable[[str], nn.Module] | None = None
    """Builds another network by model name, with ``num_classes`` outputs (DML peers)."""


class Distiller(nn.Module):
    """Base class of every method.

    Subclasses set the class attributes, implement :meth:`forward_train`, and put every
    trainable network in ``self`` as a child module. The total loss is the sum of the
    returned terms; each term is logged as ``train/loss_<term>``.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    """Authors, year and the method's full name: shown by ``kdscale methods`` and tagged in wandb."""
    description: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    teacher_role: ClassVar[Literal["none", "frozen", "trainable"]] = "none"
    teacher_outputs: ClassVar[tuple[str, ...]] = ()
    """What the method reads from a frozen teacher: ``logits`` and/or ``features``."""
    trainable_networks: ClassVar[tuple[str, ...]] = ("student",)
    """Names of the child networks the method trains (for ``kdscale methods``)."""
    optimizer_phases: ClassVar[tuple[str, ...]] = ("all",)
    """One optimizer step per phase and iteration, in this order. Only methods whose
    paper updates networks one after the other (ProKT) have more than one."""

    def __init__(self, student: nn.Module, params, ctx: MethodContext):
        super().__init__()
        self.student = student
        self.params = params
        self.label_smoothing = ctx.label_smoothing
        self.epoch = 0

    # -- the contract ---------------------------------------------------------------
    def forward_train(self, images: torch.Tensor, targets: torch.Tensor,
                      teacher_output: TeacherOutput | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student logits and the loss terms of one step (of the only phase)."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer before each epoch's steps (0-based, also after a resume);
        methods whose weights follow the epoch (FFCL's ramp-up) read ``self.epoch``."""
        self.epoch = epoch

    def forward_phase(self, phase: str, images, targets, teacher_output):
        """Loss terms of one optimizer phase; multi-phase methods override this."""
        return self.forward_train(images, targets, teacher_output)

    def forward_test(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)

    def evaluation_logits(self, images: torch.Tensor,
                          teacher_output: TeacherOutput | None = None) -> dict[str, torch.Tensor]:
        """Logits of every trainable network scored in evaluation (``val/<name>_top1``).
        Called in eval mode without gradients, with the frozen teacher's output if any."""
        return {"student": self.forward_test(images)}

    def teacher_feature_layers(self) -> list[str]:
        """Module paths of the frozen teacher whose outputs the method needs."""
        return []

    def optimizer_groups(self, phase: str) -> list[dict]:
        """Parameter groups of the optimizer that steps in ``phase``; ``lr_scale``
        multiplies the scheduled lr. Every trainable parameter is in exactly one phase."""
        return [{"params": [p for p in self.phase_module(phase).parameters() if p.requires_grad], "lr_scale": 1.0}]

    def phase_module(self, phase: str) -> nn.Module:
        """The module whose parameters ``phase`` trains (one DeepSpeed engine each)."""
        return self

    # -- plumbing -------------------------------------------------------------------
    def forward(self, images, targets=None, teacher_output=None, phase: str = "all"):
        if self.training:
            return self.forward_phase(phase, images, targets, teacher_output)
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
