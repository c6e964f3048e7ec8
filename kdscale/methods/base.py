"""The Distiller contract shared by every method, and the method registry.

Adapted in spirit from mdistiller's ``Distiller``: a method is an ``nn.Module`` that owns
its *trainable* networks as children (the student, and e.g. a scratch teacher or a
bridge module) and computes named loss terms. Frozen teachers live outside it (see
:mod:`kdscale.teachers.frozen`), so no optimizer, DDP bucket or ZeRO partition ever holds
their parameters; the method only receives their outputs.

A method author writes (copy ``kd.py``):
- class attributes ``name``, ``paper``, ``description``, ``Params`` (a dataclass) and
  ``teacher_role``: ``frozen`` (a pre-trained teacher run outside the method: KD, AT,
  CTKD's expert, SOKD), ``trainable`` (the method owns and trains the teacher network:
  ProKT, FFCL) or ``none`` (vanilla, DML);
- :meth:`Distiller.forward_train`, returning the student's logits and the loss terms;
- where needed: :meth:`teacher_needs` (which teacher layers to tap), :meth:`evaluation_logits`
  (more networks to score), :meth:`phases` (several optimizer steps per iteration, or an
  lr or weight decay of their own for some parameters);
- for state kept per training sample (CRD's memory banks): ``needs_sample_indices = True``
  (``forward_train`` then also receives ``sample_indices``, each image's dataset index) and
  :meth:`gathered_state` / :meth:`restore_gathered_state` for state that is not in the
  modules' ``state_dict`` (it differs per rank, so it must not be broadcast or saved from
  rank 0 alone).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal, NamedTuple

import torch
from torch import nn

from kdscale.errors import KdscaleError


@dataclass
class TeacherOutput:
    """What the run's frozen teachers produced for one batch.

    - ``logits``: the teacher's logits; with several teachers, the weighted mean of their
      logits (the "mean of logits" ensemble, so a method that reads one target gets a defined
      one; :mod:`kdscale.methods.ensemble` builds the other ensemble targets);
    - ``features``: the tapped features of the one teacher that gives them
      (``method.feature_teacher``, default the first);
    - ``members``: each teacher's logits by its ``id`` (a replayed teacher's: the log of its
      stored probabilities), in config order; one teacher: ``{id: logits}``, empty when the
      output was built by hand;
    - ``weights``: each teacher's ``weight``, normalised to sum to 1, same keys as ``members``;
    - ``member_features``: each teacher's feature targets by id, ``{"summary": (B, D),
      "spatial": (B, C, H, W)}`` with the kinds its entry's ``targets`` asks for
      (:mod:`kdscale.models.feature_targets`); only for a method whose needs say ``targets``.
      A teacher without ``logits`` among its targets is not in ``members``.
    """

    logits: torch.Tensor | None
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    members: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    member_features: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def member_items(self) -> list[tuple[str, torch.Tensor, float]]:
        """``(id, logits, weight)`` per teacher; a hand-built output is one teacher of weight 1."""
        if not self.members:
            return [("teacher", self.logits, 1.0)]
        return [(tid, logits, self.weights.get(tid, 1.0 / len(self.members))) for tid, logits in self.members.items()]


class EvaluationFeatures(NamedTuple):
    """What validation scores of the features: summary vectors for k-NN by network name, and
    each teacher's per-image cosine similarity to its adapted student features
    (``<id>`` for the summary, ``<id>_spatial`` for the map, averaged over the grid)."""

    summaries: dict[str, torch.Tensor]
    cosines: dict[str, torch.Tensor]


@dataclass(frozen=True)
class TeacherNeeds:
    """What a method reads from the frozen teacher for each batch."""

    logits: bool = False
    features: tuple[str, ...] = ()
    """Module paths of the frozen teacher whose outputs are tapped (forward hooks)."""
    targets: bool = False
    """Whether the method reads every teacher's feature targets (``member_features``: the
    summary and spatial features each teacher entry's ``targets`` names)."""

    def describe(self) -> str:
        """``logits``, ``features``, ``targets``, several of them, or ``none``."""
        return ", ".join((["logits"] if self.logits else []) + (["features"] if self.features else [])
                         + (["targets"] if self.targets else [])) or "none"


@dataclass
class Phase:
    """One optimizer step per iteration: the module it trains and how.

    ``lr_scale`` multiplies the scheduled lr of every group; ``groups`` (optional) splits
    the module's parameters into optimizer groups with settings of their own (e.g.
    ``{"params": [...], "weight_decay": 1e-5}``); together they must hold every trainable
    parameter of ``module`` once."""

    module: nn.Module
    lr_scale: float = 1.0
    groups: list[dict] | None = None

    def param_groups(self) -> list[dict]:
        groups = self.groups or [{"params": [p for p in self.module.parameters() if p.requires_grad]}]
        return [{**group, "params": list(group["params"]), "lr_scale": group.get("lr_scale", 1.0) * self.lr_scale}
                for group in groups]


@dataclass
class NoParams:
    """A method without parameters of its own."""


@dataclass
class MethodContext:
    """What a method may use to build itself.

    A teacher network reaches the method under the name of its role: ``frozen_teacher``
    (read-only: shapes, layer names; it is run outside the method) or ``trained_teacher``
    (the method makes it a child and trains it). Reading one that this run does not have
    is a configuration error, raised with the fix."""

    num_classes: int
    image_size: int
    method_name: str = ""
    student_name: str = ""
    teacher_name: str = ""
    label_smoothing: float = 0.0
    teacher_network: nn.Module | None = None
    teacher_role: str = "none"
    teacher_pretrained: bool = False
    """Whether the teacher network was loaded from ``teacher.weights``."""
    teacher_ids: tuple[str, ...] = ()
    """The ``id`` of every frozen teacher of the run, in config order (online or replayed;
    empty without frozen teachers). More than one: the method gets an ensemble
    (:class:`TeacherOutput`'s ``members``) and may refuse in one line if it cannot use one."""
    teacher_targets: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)
    """Each frozen teacher's feature targets by id, with each kind's shape per image (from a
    dry forward at the teacher's input size): ``{"summary": (D,), "spatial": (C, H, W)}``;
    only the kinds its entry's ``targets`` names beside ``logits``."""
    teacher_weights: dict[str, float] = field(default_factory=dict)
    """Each frozen teacher's ``weight`` by id, normalised over all of them to sum to 1."""
    build_model: Callable[[str], nn.Module] | None = None
    """Builds another network by model name, with ``num_classes`` outputs (DML peers)."""
    seed: int = 0
    """The run's ``experiment.seed``."""
    train_labels: torch.Tensor | None = None
    """The label of every training sample by dataset index (-1 where unknown); given to
    methods with ``needs_sample_indices`` (see :mod:`kdscale.data.sample_index`)."""

    def _teacher(self, role: str) -> nn.Module:
        if self.teacher_network is not None and self.teacher_role == role:
            return self.teacher_network
        if role == "frozen":
            raise KdscaleError(f"method {self.method_name!r} needs features: use teacher.source=online "
                               f"(teacher.source=shards replays the teacher's logits only, not its layers)")
        raise KdscaleError(f"method {self.method_name!r} trains a teacher network: set teacher.name")

    @property
    def frozen_teacher(self) -> nn.Module:
        return self._teacher("frozen")

    @property
    def trained_teacher(self) -> nn.Module:
        return self._teacher("trainable")


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
    needs_labels: ClassVar[bool] = True
    """Whether a loss term reads the class labels (``targets``). A method whose terms all work
    without labels sets it False: only such a method trains with ``data.labels=none``
    (unlabelled shards, targets -1); :func:`kdscale.train.setup.plan_data` refuses the others."""
    distils_features: ClassVar[bool] = False
    """Whether the method teaches feature targets (``train.knn_eval=auto`` then scores k-NN)."""
    needs_sample_indices: ClassVar[bool] = False
    """Whether :meth:`forward_train` takes ``sample_indices``: the training images' dataset
    indices (int64, ``(B,)``), numbered from the shards' ``index.json``."""

    def __init__(self, student: nn.Module, params, context: MethodContext):
        super().__init__()
        self.student = student
        self.params = params
        self.label_smoothing = context.label_smoothing
        self.epoch = 0

    @classmethod
    def labels_needed(cls, params) -> bool:
        """Whether a run with these ``params`` reads labels (default: ``needs_labels``); a
        method whose label terms can be weighted off says so from its params."""
        return cls.needs_labels

    # -- the contract ---------------------------------------------------------------
    def forward_train(self, images: torch.Tensor, targets: torch.Tensor, teacher_output: TeacherOutput | None,
                      phase: str = "all") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The logits of the network ``phase`` trains (the student's by default) and the loss
        terms of that phase. ``teacher_output`` is the frozen teacher's for these images
        (online or replayed), None when :meth:`teacher_needs` asks for nothing."""
        raise NotImplementedError

    def teacher_needs(self) -> TeacherNeeds:
        """What :meth:`forward_train` reads from the frozen teacher. Default: its logits when
        the method has a frozen teacher (``teacher_role = "frozen"``), else nothing."""
        return TeacherNeeds(logits=self.teacher_role == "frozen")

    def phases(self) -> dict[str, Phase]:
        """The optimizer steps of one iteration, in order: one step of everything (default).
        Every trainable parameter is in exactly one phase. Only methods whose authors
        update networks one after the other (ProKT) have more than one."""
        return {"all": Phase(self)}

    def evaluation_logits(self, images: torch.Tensor,
                          teacher_output: TeacherOutput | None = None) -> dict[str, torch.Tensor]:
        """Logits of every trainable network scored in evaluation (``val/<name>_top1``).
        Called in eval mode without gradients, with the frozen teacher's output if any."""
        return {"student": self.student(images)}

    def evaluation_features(self, images: torch.Tensor, teacher_output: TeacherOutput | None = None):
        """What validation scores of the features (``train.knn_eval``): a ``(summaries,
        cosines)`` pair (:class:`EvaluationFeatures`): summary vectors
        by network name for k-NN (``val/<name>_knn_top1``) and per-image cosine similarities
        of adapted student features to each teacher's (``val/cosine_<id>``). Default: the
        student's input to its classifier, no cosines."""
        from kdscale.models.feature_targets import FeatureTargets

        targets = FeatureTargets(self.student, ["summary"], where="student")
        try:
            return EvaluationFeatures({"student": targets(images)[1]["summary"]}, {})
        finally:
            targets.remove()

    def feature_statistics(self) -> dict[str, tuple[str, str]]:
        """Teacher targets whose statistics the method needs before its first step, by name:
        ``(teacher id, kind)`` (:mod:`kdscale.train.feature_statistics` gathers them and calls
        :meth:`set_feature_statistics`). Default: none."""
        return {}

    def set_feature_statistics(self, name: str, count: float, total: torch.Tensor, outer: torch.Tensor) -> None:
        """The count, sum and sum of outer products (float64, every rank's) of target ``name``."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer before each epoch's steps (0-based, also after a resume);
        methods whose weights follow the epoch (FFCL's ramp-up) read ``self.epoch``."""
        self.epoch = epoch

    def gathered_state(self) -> dict | None:
        """State outside the modules' ``state_dict`` that a checkpoint must hold (per-rank
        shards, e.g. memory banks), gathered whole: called on every rank (it may be a
        collective), the result is saved from rank 0. Default: none."""
        return None

    def restore_gathered_state(self, state: dict) -> None:
        """Take back what :meth:`gathered_state` returned, on any number of ranks."""

    def state_bytes_per_sample(self) -> int:
        """Bytes of state kept per training sample, its rows sharded across ranks (``kdscale
        plan`` counts ``ceil(N / ranks)`` of them per rank). Default: none."""
        return 0

    # -- plumbing -------------------------------------------------------------------
    def forward(self, images, targets, teacher_output=None, phase: str = "all", sample_indices=None):
        """What DDP and DeepSpeed wrap: one phase's training forward."""
        if self.needs_sample_indices:
            if sample_indices is None:
                raise KdscaleError(f"method {self.name!r} needs each image's dataset index; the batch carries none")
            return self.forward_train(images, targets, teacher_output, phase, sample_indices=sample_indices)
        return self.forward_train(images, targets, teacher_output, phase)

    def trained_networks(self) -> list[str]:
        """Names of the child modules that hold trainable parameters."""
        return [name for name, child in self.named_children() if any(p.requires_grad for p in child.parameters())]


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
