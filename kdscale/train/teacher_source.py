"""Where a training step's frozen-teacher output comes from.

- :class:`OnlineTeacher`: the frozen teacher runs on the step's (mixed) images.
- :class:`ReplayedTeacher`: the teacher's stored top-k probabilities, read from
  teacher-output shards beside the image shards and mixed with the images
  (:mod:`kdscale.data.teacher_outputs`); the method gets their log as logits.
- :class:`NoTeacher`: the method reads nothing from a frozen teacher.

Each is called as ``source(images, replayed_probs) -> TeacherOutput | None`` and says
whether every rank must call it together (``lockstep``: a ZeRO-3 partitioned teacher
gathers its parameters in each forward).

:func:`teacher_source` also gives an online frozen teacher its own view of the batch
(``teacher.mean`` / ``std`` / ``input_size``, else its pretrained weights' metadata, else
the data section's; :mod:`kdscale.teachers.views`); the trainer's validation calls the same
:class:`FrozenTeacher`, so training and evaluation agree.
"""

from __future__ import annotations

import warnings

import torch

from kdscale.config.schema import ExperimentConfig
from kdscale.lifecycle.watchdog import Watchdog
from kdscale.log import log
from kdscale.methods import TeacherOutput
from kdscale.teachers.frozen import FrozenTeacher
from kdscale.teachers.views import teacher_view


class NoTeacher:
    lockstep = False
    frozen: FrozenTeacher | None = None
    outputs_dir: str | None = None

    def __call__(self, images: torch.Tensor, replayed_probs: torch.Tensor | None) -> None:
        return None


class OnlineTeacher(NoTeacher):
    def __init__(self, frozen: FrozenTeacher, watchdog: Watchdog):
        self.frozen, self.watchdog, self.lockstep = frozen, watchdog, frozen.lockstep

    def __call__(self, images, replayed_probs) -> TeacherOutput:
        with self.watchdog.waiting("running the frozen teacher"):
            return self.frozen(images)


class ReplayedTeacher(NoTeacher):
    def __init__(self, outputs_dir: str):
        self.outputs_dir = outputs_dir

    def __call__(self, images, replayed_probs) -> TeacherOutput:
        return TeacherOutput(replayed_probs.clamp_min(1e-12).log())


def teacher_source(cfg: ExperimentConfig, frozen: FrozenTeacher | None, watchdog: Watchdog) -> NoTeacher:
    if cfg.teacher is not None and cfg.teacher.source == "shards":
        return ReplayedTeacher(cfg.teacher.outputs)
    if frozen is None:
        preprocessing = [k for k in ("mean", "std", "input_size") if getattr(cfg.teacher, k, None) is not None]
        if preprocessing:
            warnings.warn(f"teacher.{', teacher.'.join(preprocessing)} ignored: only a frozen teacher has its own "
                          f"view; a teacher the method trains sees the student's (data.mean, data.std, "
                          f"data.image_size)", stacklevel=2)
        return NoTeacher()
    frozen.view = teacher_view(cfg.data, cfg.teacher)
    if not frozen.view.identity:
        log.info(f"frozen teacher {cfg.teacher.name} sees its own view: {frozen.view.describe()}")
    return OnlineTeacher(frozen, watchdog)
