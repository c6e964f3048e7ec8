"""Where a training step's frozen-teacher output comes from: the run's teachers as one source.

Each teacher is a member of :class:`TeacherSource`, in config order:
- online: its :class:`~kdscale.teachers.frozen.FrozenTeacher` runs on the step's (mixed)
  images, in its own view (``mean`` / ``std`` / ``input_size``, else its pretrained weights'
  metadata, else the data section's; :mod:`kdscale.teachers.views`);
- replayed: its stored top-k probabilities, read from its teacher-output shards beside the
  image shards and mixed with the images (:mod:`kdscale.data.teacher_outputs`); the method
  gets their log as logits. A teacher whose store holds feature targets (summary, spatial)
  gets the stored ones of the replayed crop as its ``member_features`` (float16 on disk);
  one without ``logits`` among its targets gives no logits. The loader reads every replayed
  teacher's shards and replays the one crop they all stored, so an online teacher beside
  them sees that crop too.

The source is called as ``source(images, replayed) -> TeacherOutput | None`` (``replayed``:
a :class:`~kdscale.data.teacher_outputs.Replayed`, or only the probabilities ``(B, replayed
teachers, classes)``, where a replayed teacher's features are then zeros of their shapes:
the planner's dry step) and says whether every rank must
call it together (``lockstep``: a ZeRO-3 partitioned teacher gathers its parameters in each
forward). The trainer's validation runs the same online teachers (:meth:`TeacherSource.
evaluation_outputs`), so training and evaluation agree. One teacher gives exactly what it
gave before there could be several: its logits, untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import torch

from kdscale.config.schema import ExperimentConfig
from kdscale.config.teachers import feature_teacher_id
from kdscale.data.teacher_outputs import Replayed
from kdscale.lifecycle.watchdog import Watchdog
from kdscale.log import log
from kdscale.methods import TeacherOutput
from kdscale.methods.ensemble import mean_of_logits
from kdscale.teachers.frozen import FrozenTeacher
from kdscale.teachers.views import teacher_view


@dataclasses.dataclass
class Member:
    id: str
    weight: float
    """Normalised over the run's frozen teachers (they sum to 1)."""
    frozen: FrozenTeacher | None = None
    """Online: the network that runs; replayed: None."""
    replay_slot: int | None = None
    """Replayed: its index in the batch's replayed outputs (and in :attr:`TeacherSource.outputs_dirs`)."""
    replay_logits: bool = True
    """Replayed: whether it gives logits (``logits`` among its targets)."""
    replay_shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    """Replayed: the feature targets it gives and their shapes per image (its ``teacher_outputs.json``)."""


class TeacherSource:
    """The run's frozen teachers (none for a method without one: it is then called for nothing
    and returns None)."""

    def __init__(self, members: list[Member], feature_id: str | None, watchdog: Watchdog | None = None,
                 outputs_dirs: list[str] | None = None):
        self.members, self.feature_id, self.watchdog = members, feature_id, watchdog
        self.outputs_dirs = outputs_dirs or []
        self.lockstep = any(m.frozen is not None and m.frozen.lockstep for m in members)
        self.online = {m.id: m.frozen for m in members if m.frozen is not None}

    @property
    def frozen(self) -> FrozenTeacher | None:
        """The online frozen teacher of a run that has exactly one teacher (None otherwise)."""
        return self.members[0].frozen if len(self.members) == 1 else None

    def __call__(self, images: torch.Tensor, replayed: Replayed | torch.Tensor | None) -> TeacherOutput | None:
        if not self.members:
            return None
        if isinstance(replayed, torch.Tensor):
            replayed = Replayed(replayed, {})
        outputs = {}
        for member in self.members:
            if member.frozen is not None:
                waiting = self.watchdog.waiting(f"running the frozen teacher {member.id}") if self.watchdog \
                    else contextlib.nullcontext()
                with waiting:
                    outputs[member.id] = member.frozen(images)
            else:
                outputs[member.id] = self._replayed(member, replayed, images)
        return self.combine(outputs)

    @staticmethod
    def _replayed(member: Member, replayed: Replayed, images: torch.Tensor) -> TeacherOutput:
        slot = member.replay_slot
        logits = replayed.probs[:, slot].clamp_min(1e-12).log() if member.replay_logits else None
        output = TeacherOutput(logits)
        if member.replay_shapes:
            stored = replayed.features.get(slot) or {
                kind: images.new_zeros(len(images), *shape) for kind, shape in member.replay_shapes.items()}
            output.member_features = {"": {kind: stored[kind] for kind in member.replay_shapes}}
        return output

    def combine(self, outputs: dict[str, TeacherOutput]) -> TeacherOutput:
        """One output from the members' (all or some of them): each member's logits, the
        weighted mean of the logits as ``logits`` (one member: its logits), the feature
        teacher's features."""
        weights = {m.id: m.weight for m in self.members if m.id in outputs and outputs[m.id].logits is not None}
        if len(weights) < len(self.members) and weights:  # without replayed or features-only teachers: renormalised
            total = sum(weights.values())
            weights = {k: w / total for k, w in weights.items()}
        members = {tid: outputs[tid].logits for tid in weights}
        features = outputs[self.feature_id].features if self.feature_id in outputs else {}
        combined = TeacherOutput(next(iter(members.values()), None), features, members, weights)
        combined.member_features = {tid: out.member_features[""] for tid, out in outputs.items()
                                    if "" in out.member_features}
        if members:
            combined.logits = mean_of_logits(combined)  # one teacher: its logits, the same tensor
        return combined

    def evaluation_outputs(self, images: torch.Tensor) -> TeacherOutput | None:
        """The online teachers' output on validation images (replayed teachers have none there)."""
        if not self.online:
            return None
        return self.combine({tid: frozen(images) for tid, frozen in self.online.items()})


def teacher_source(cfg: ExperimentConfig, frozen: dict[str, FrozenTeacher], watchdog: Watchdog,
                   method_reads_teachers: bool = True) -> TeacherSource:
    """The source of ``cfg.teachers`` given the online ones built (:func:`kdscale.train.setup.
    build_distiller`); each online teacher gets its own view of the batch.
    ``method_reads_teachers``: False for a method with no frozen teacher (the source is empty)."""
    if not method_reads_teachers or (not frozen and not any(s.source == "shards" for s in cfg.teachers)):
        for spec in cfg.teachers:
            preprocessing = [k for k in ("mean", "std", "input_size") if getattr(spec, k, None) is not None]
            if preprocessing:
                warnings.warn(f"teacher.{', teacher.'.join(preprocessing)} ignored: only a frozen teacher has its "
                              f"own view; a teacher the method trains sees the student's (data.mean, data.std, "
                              f"data.image_size)", stacklevel=2)
        return TeacherSource([], None, watchdog)
    total = sum(spec.weight for spec in cfg.teachers)
    members, outputs_dirs = [], []
    for spec in cfg.teachers:
        member = Member(spec.id, spec.weight / total)
        if spec.source == "shards":
            from kdscale.train.teacher_setup import replayed_target_shapes, teacher_kinds

            member.replay_slot = len(outputs_dirs)
            member.replay_logits = "logits" in teacher_kinds(spec)
            member.replay_shapes = replayed_target_shapes(cfg, spec)
            outputs_dirs.append(spec.outputs)
        else:
            member.frozen = frozen[spec.id]
            member.frozen.view = teacher_view(cfg.data, spec)
            if not member.frozen.view.identity:
                log.info(f"frozen teacher {spec.id} ({spec.name}) sees its own view: {member.frozen.view.describe()}")
        members.append(member)
    return TeacherSource(members, feature_teacher_id(cfg), watchdog, outputs_dirs)
