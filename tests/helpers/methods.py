"""Build methods on small real networks for loss and gradient tests."""

from __future__ import annotations

import torch

from kdscale.methods import MethodContext, TeacherOutput, get_method_class
from kdscale.models import FeatureTaps, build_model
from kdscale.models.feature_targets import FeatureTargets
from kdscale.teachers.frozen import FrozenTeacher

NUM_CLASSES = 10
TRAIN_SAMPLES = 64
"""The probe training set's size (methods that keep state per sample: CRD)."""
TINY_DEIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
"""timm keyword arguments that shrink a distilled ViT to 32 px, 16 patches and one block."""


def tiny_distilled_vit(num_classes: int = NUM_CLASSES):
    """A timm distilled ViT (DeiT's student) small enough for CPU tests, with random weights."""
    import timm

    return timm.create_model("deit_tiny_distilled_patch16_224", num_classes=num_classes, **TINY_DEIT)


STUDENTS = {"deit": tiny_distilled_vit}
"""Methods that need a student of their own kind get it here instead of ``student``."""
FEATURE_TARGETS = {"features": ["summary", "spatial"]}
"""Methods that distil feature targets: their teacher's entry ``targets`` (with its logits
too, for the KD term); the teacher gives them under its id ``teacher``, as a run's does."""


class FeatureTeacher:
    """A frozen teacher whose feature targets come filed under its id (``member_features``),
    as the run's teacher source files them; ``model`` is the frozen network."""

    def __init__(self, frozen: FrozenTeacher, teacher_id: str = "teacher"):
        self.frozen, self.model, self.teacher_id = frozen, frozen.model, teacher_id

    def __call__(self, images):
        output = self.frozen(images)
        output.member_features = {self.teacher_id: output.member_features[""]}
        output.members, output.weights = {self.teacher_id: output.logits}, {self.teacher_id: 1.0}
        return output


def build_method(name: str, student: str = "resnet8", teacher: str | None = None, **params):
    """(method, frozen_teacher_or_None); seeds fixed so every call builds the same weights."""
    torch.manual_seed(0)
    cls = get_method_class(name)
    teacher_model = build_model(teacher, NUM_CLASSES) if teacher else None
    targets = FeatureTargets(teacher_model, FEATURE_TARGETS[name], where="teacher", logits=True) \
        if name in FEATURE_TARGETS else None
    context = MethodContext(num_classes=NUM_CLASSES, image_size=32, method_name=name, student_name=student,
                        teacher_name=teacher or "", teacher_network=teacher_model, teacher_role=cls.teacher_role,
                        teacher_pretrained=bool(teacher),
                        teacher_targets={"teacher": targets.shapes((32, 32))} if targets else {},
                        teacher_weights={"teacher": 1.0} if targets else {},
                        build_model=lambda n: build_model(n, NUM_CLASSES),
                        train_labels=torch.arange(TRAIN_SAMPLES) % NUM_CLASSES)
    student_model = STUDENTS[name]() if name in STUDENTS else build_model(student, NUM_CLASSES)
    method = cls(student_model, cls.Params(**params), context).train()
    frozen = None
    if cls.teacher_role == "frozen":
        frozen = FrozenTeacher(teacher_model, list(method.teacher_needs().features), torch.device("cpu"), None, False,
                               targets=targets)
        frozen = FeatureTeacher(frozen) if targets else frozen
    return method, frozen


def batch(size: int = 4, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 32, 32, generator=gen), torch.randint(0, NUM_CLASSES, (size,), generator=gen)


def sample_indices(size: int, seed: int = 1) -> torch.Tensor:
    """Distinct dataset indices of the probe training set for a batch."""
    return torch.randperm(TRAIN_SAMPLES, generator=torch.Generator().manual_seed(seed))[:size]


def run_forward(method, images, targets, teacher_output, phase: str = "all", seed: int = 1):
    """``method(...)`` with dataset indices for the methods that read them (CRD)."""
    extra = {"sample_indices": sample_indices(len(images), seed)} if method.needs_sample_indices else {}
    return method(images, targets, teacher_output, phase=phase, **extra)


def tap(module, layers):
    return FeatureTaps(module, layers, where="test")


def rows(tensor):
    return tensor.detach().double().tolist()


def grads(loss, module):
    """Gradients of ``loss`` w.r.t. ``module``'s parameters (None where unused)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def no_grad_from(loss, module) -> bool:
    return all(g is None or not g.abs().sum() for g in grads(loss, module))


def has_grad_from(loss, module) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in grads(loss, module))


__all__ = ["FEATURE_TARGETS", "STUDENTS", "TINY_DEIT", "FeatureTeacher", "TeacherOutput", "batch", "build_method",
           "grads", "has_grad_from", "no_grad_from", "rows", "run_forward", "sample_indices", "tap",
           "tiny_distilled_vit"]
