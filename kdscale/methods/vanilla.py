"""``vanilla``: one network trained alone with cross-entropy.

Used to train teachers and the student-only baselines every KD result is compared to.
"""

from __future__ import annotations

from kdscale.methods.base import Distiller, register_method
from kdscale.methods.losses import cross_entropy


@register_method
class Vanilla(Distiller):
    name = "vanilla"
    paper = "cross-entropy alone"
    description = "The student alone with cross-entropy (teacher training, baselines)."

    def forward_train(self, images, targets, teacher_output, phase="all"):
        logits = self.student(images)
        return logits, {"ce": cross_entropy(logits, targets, self.label_smoothing)}
