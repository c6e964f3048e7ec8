"""Where a training step's frozen-teacher output comes from.

- :class:`OnlineTeacher`: the frozen teacher runs on the step's (mixed) images.
- :class:`ReplayedTeacher`: the teacher's stored top-k probabilities, read from
  teacher-output shards beside the image shards and mixed with the images
  (:mod:`kdscale.data.teacher_outputs`); the method gets their log as logits.
- :class:`NoTeacher`: the method reads nothing from a frozen teacher.

Each is called as ``source(images, replayed_probs) -> TeacherOutput | None`` and says
whether every rank must call it together (``lockstep``: a ZeRO-3 partitioned teacher
gathers its parameters in each forward).
"""

from __future__ import annotations

import torch

from kdscale.config.schema import ExperimentConfig
from kdscale.lifecycle.watchdog import Watchdog
from kdscale.methods import TeacherOutput
from kdscale.runtime.teachers import FrozenTeacher


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
    return OnlineTeacher(frozen, watchdog) if frozen is not None else NoTeacher()
