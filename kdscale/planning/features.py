"""What ``kdscale plan`` says of a feature-distilling run (method ``features``, AM-RADIO):
the trained adaptor heads per teacher, and the size of the teachers' feature targets once
stored by ``kdscale.teach``.

- Adaptor heads: the trained modules of the method's ``adaptors`` (named ``<id>_<kind>``,
  one per teacher and target kind). They are trained parameters of the method, so they are
  already in the plan's trained Ψ (gradients, optimizer state, communication); the report
  shows them apart from the student.
- Stored targets: per crop, a summary vector of D elements and a spatial map of C x H x W,
  stored as fp16 (2 bytes each): ``2D`` and ``2CHW`` bytes; per image times the entry's
  ``crops_per_image``; over the run's training samples (``data.train_samples``, else the
  shards' ``index.json``). The shapes come from a dry forward of each online teacher at its
  own input size (the size its view resizes the student's crop to), as the run sizes its
  adaptor heads.
"""

from __future__ import annotations

import dataclasses
import math

from torch import nn

from kdscale.config.schema import ExperimentConfig
from kdscale.config.teachers import teacher_key
from kdscale.errors import KdscaleError
from kdscale.log import human_bytes

TARGET_BYTES = 2  # fp16 per stored element


@dataclasses.dataclass
class TeacherTargets:
    """One teacher's feature targets: each kind's shape per crop and its adaptor head's
    parameters (0 where the method trains none for it)."""

    id: str
    name: str
    shapes: dict[str, tuple[int, ...]]
    adaptor_parameters: dict[str, int]
    crops_per_image: int

    def bytes_per_crop(self, kind: str | None = None) -> int:
        kinds = [kind] if kind else list(self.shapes)
        return sum(TARGET_BYTES * math.prod(self.shapes[k]) for k in kinds)

    @property
    def bytes_per_image(self) -> int:
        return self.bytes_per_crop() * self.crops_per_image

    @property
    def adaptors(self) -> int:
        return sum(self.adaptor_parameters.values())


@dataclasses.dataclass
class FeaturePlan:
    teachers: list[TeacherTargets]
    student: int  # the student's trained parameters (the rest of the trained count: adaptor heads)
    samples: int | None  # training samples; None where the config does not say how many

    @property
    def adaptors(self) -> int:
        return sum(t.adaptors for t in self.teachers)

    def dataset_bytes(self, teacher: TeacherTargets) -> int | None:
        return None if self.samples is None else teacher.bytes_per_image * self.samples


def adaptor_parameters(distiller: nn.Module) -> dict[str, dict[str, int]]:
    """Trained parameter elements of each adaptor head, by teacher id and kind."""
    heads = getattr(distiller, "adaptors", None)
    found: dict[str, dict[str, int]] = {}
    if isinstance(heads, nn.ModuleDict):
        for name, head in heads.items():
            tid, kind = name.rsplit("_", 1)
            found.setdefault(tid, {})[kind] = sum(p.numel() for p in head.parameters() if p.requires_grad)
    return found


def feature_plan(cfg: ExperimentConfig, distiller: nn.Module, frozen: dict) -> FeaturePlan | None:
    """The plan's feature section, or None when no online frozen teacher gives feature targets."""
    from kdscale.models.preprocessing import network_preprocessing

    heads = adaptor_parameters(distiller)
    teachers = []
    for spec in cfg.teachers:
        teacher = frozen.get(spec.id)
        targets = getattr(teacher, "targets", None)
        if targets is None:
            continue
        size = network_preprocessing(cfg.data, spec, teacher_key(cfg, spec)).input_size
        shapes = targets.shapes(size)
        teachers.append(TeacherTargets(spec.id, spec.name, shapes, {k: heads.get(spec.id, {}).get(k, 0)
                                                                   for k in shapes}, spec.crops_per_image))
    if not teachers:
        return None
    student = sum(p.numel() for p in distiller.student.parameters() if p.requires_grad)
    return FeaturePlan(teachers, student, _samples(cfg))


def _samples(cfg: ExperimentConfig) -> int | None:
    from kdscale.planning.networks import training_samples

    try:
        return training_samples(cfg)
    except KdscaleError:
        return None


def features_text(plan: FeaturePlan | None) -> str:
    """The report's lines: the adaptor heads per teacher, then each teacher's stored targets."""
    if plan is None:
        return ""
    lines = [f"adaptor heads (trained, in the count above): student {plan.student / 1e6:.2f} M + adaptor heads "
             f"{plan.adaptors / 1e6:.2f} M parameters; "
             + ", ".join(f"{t.id}: " + " + ".join(f"{kind} {n / 1e6:.3f} M" for kind, n in t.adaptor_parameters.items())
                         for t in plan.teachers)]
    for t in plan.teachers:
        kinds = " + ".join(f"{kind} {'x'.join(map(str, shape))} ({t.bytes_per_crop(kind)} B)"
                           for kind, shape in t.shapes.items())
        dataset = plan.dataset_bytes(t)
        total = (f"x {plan.samples} training samples = {human_bytes(dataset, 2)} ({dataset} B)" if dataset is not None
                 else "whole dataset: set data.train_samples")
        lines.append(f"stored feature targets (kdscale.teach, fp16) of {t.id} ({t.name}): {kinds} = "
                     f"{t.bytes_per_crop()} B per crop x {t.crops_per_image} crops = {t.bytes_per_image} B "
                     f"({human_bytes(t.bytes_per_image, 2)}) per sample; {total}")
    return "\n".join(lines) + "\n"
