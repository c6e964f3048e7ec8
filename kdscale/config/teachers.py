"""The run's teacher list, resolved once after loading.

A config names its teachers either as one ``teacher:`` section or as a ``teachers:`` list
(any number of frozen teachers; Hinton et al. 2015 distil an ensemble). Both mean a list:
after loading, ``cfg.teachers`` holds every teacher and ``cfg.teacher`` is None. Each entry
gets its ``id`` (default ``teacher`` for a run's only teacher, ``teacher<i>`` for entry i of a
list), checked here with ``method.feature_teacher`` so that a mistake names its entry
(``teachers[1].id``) before anything starts.
"""

from __future__ import annotations

import re

from kdscale.errors import KdscaleError

ID_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
RESERVED_IDS = ("student", "ensemble", "agreement", "samples", "skipped_samples")
"""Ids a teacher cannot take: they are metric names already (``val/student_top1``,
``val/ensemble_top1``, ``val/agreement_top1``, ...)."""


def resolve_teachers(cfg, where) -> None:
    """Fold ``teacher`` into ``teachers``, give every entry its id, check ids and
    ``method.feature_teacher``. ``where(key)``: the message prefix naming the key's origin."""
    if cfg.teacher is not None and cfg.teachers:
        raise KdscaleError(f"{where('teacher')}: set either teacher (one teacher) or teachers (a list), not both")
    listed = bool(cfg.teachers)
    if cfg.teacher is not None:
        cfg.teachers, cfg.teacher = [cfg.teacher], None
    seen: dict[str, int] = {}
    for i, spec in enumerate(cfg.teachers):
        key = f"teachers[{i}]" if listed else "teacher"
        if spec.id is None:
            spec.id = "teacher" if len(cfg.teachers) == 1 else f"teacher{i}"
        elif not ID_PATTERN.match(spec.id):
            raise KdscaleError(f"{where(key + '.id')}: {spec.id!r} is not a valid id (a letter, then letters, "
                               f"digits, _ or -: it names metrics such as val/<id>_top1)")
        if spec.id in RESERVED_IDS:
            raise KdscaleError(f"{where(key + '.id')}: {spec.id!r} is a metric name already; choose another id")
        if spec.id in seen:
            raise KdscaleError(f"{where(key + '.id')}: {spec.id!r} is also the id of teachers[{seen[spec.id]}]; "
                               f"ids must differ")
        seen[spec.id] = i
    feature_teacher = cfg.method.feature_teacher
    if feature_teacher is not None and feature_teacher not in seen:
        known = ", ".join(seen) or "none (the run has no teacher)"
        raise KdscaleError(f"{where('method.feature_teacher')}: no teacher has id {feature_teacher!r}; "
                           f"teacher ids: {known}")


def feature_teacher_id(cfg) -> str | None:
    """The id of the teacher whose layers a feature method taps: ``method.feature_teacher``,
    else the first teacher's."""
    if cfg.method.feature_teacher is not None:
        return cfg.method.feature_teacher
    return cfg.teachers[0].id if cfg.teachers else None


def teacher_key(cfg, spec) -> str:
    """How messages name a teacher entry: ``teacher`` for a run's only one, ``teachers[i]``."""
    if len(cfg.teachers) == 1:
        return "teacher"
    return f"teachers[{next(i for i, s in enumerate(cfg.teachers) if s is spec)}]"
