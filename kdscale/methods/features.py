"""``features``: distil frozen teachers' features into the student (AM-RADIO's recipe).

Ranzinger, Heinrich, Kautz & Molchanov, CVPR 2024, "AM-RADIO: Agglomerative Vision
Foundation Model -- Reduce All Domains Into One" (arXiv 2312.06709). Foundation models
(DINOv2, CLIP, SigLIP, SAM encoders) teach their features, not classes, so no term needs
labels unless ``ce_weight > 0``.

Each teacher entry names what it teaches (``targets``: ``summary``, ``spatial``, and
``logits`` for the KD term; :mod:`kdscale.models.feature_targets` takes them from the
teacher's and the student's networks). For every teacher ``i`` and kind, the student gets
its own trained adaptor head (:mod:`kdscale.methods.feature_adaptors`: RADIO's MLP2, per
location for the spatial map, resized to the teacher's grid) and the terms are::

    summary_<id> = summary_weight * w_i * mean_b (1 - cos(a_i(s_b), t_i,b))
    spatial_<id> = spatial_weight * w_i * (cosine_weight * mean (1 - cos) + smooth_l1_weight * mean smooth-L1)
    ce           = ce_weight * CE(z_S, y)                        (only with ce_weight > 0)
    kd           = kd_weight * T^2 KL(p_T^T || p_S^T)            (teachers with logits in targets)

Choices (stated; RADIO's repository has no training code, so they follow the paper and
``../shared/design/methods.md``):
- ``w_i`` is the teacher entry's ``weight`` normalised over the teachers that give features
  (one teacher: 1); the paper weighs teachers equally;
- the targets are the teachers' raw features unless ``standardize`` is ``channel`` or ``phi-s``
  (:mod:`kdscale.methods.feature_standardization`): then each (teacher, kind) target is
  standardized with statistics of ``standardize_batches`` training batches per rank, gathered
  before the first step (:mod:`kdscale.train.feature_statistics`), and the adaptor heads
  predict the standardized targets (the cosines in validation compare those too);
- the summary is the student's input to its classifier, its spatial map the input of its
  global pool (timm: ``forward_head(pre_logits=True)`` and ``forward_features``);
  ``student_summary_layer`` / ``student_spatial_layer`` name other modules;
- the adaptor's hidden width is the teacher's feature width unless ``hidden`` is set;
  ``inner`` residual blocks, default 0;
- the student's classifier is kept (its logits are the method's logits and feed CE/KD when
  on; the export holds the whole student, adaptor heads apart); the student's parameters no
  term reaches (the classifier without CE/KD, what follows the map when only maps are
  taught) are frozen as built, found by one dry backward;
- the adaptor heads are drawn from ``experiment.seed`` (forked RNG), so they are the same
  whatever the teachers' builds drew (a ZeRO-3 teacher's shape twin draws nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdscale.errors import KdscaleError
from kdscale.log import log
from kdscale.methods.base import Distiller, EvaluationFeatures, TeacherNeeds, register_method
from kdscale.methods.feature_adaptors import MLPAdaptor, SpatialAdaptor, spatial_loss, summary_loss
from kdscale.methods.feature_standardization import TargetStandardizer
from kdscale.methods.losses import cross_entropy, soft_kl
from kdscale.models.feature_targets import FeatureTargets


def _adaptor_name(teacher_id: str, kind: str) -> str:
    return f"{teacher_id}_{kind}"


@register_method
class Features(Distiller):
    name = "features"
    paper = "Ranzinger et al. 2024, AM-RADIO (feature distillation)"
    description = "Adaptor heads on the student match each teacher's summary and spatial features; no labels needed."
    teacher_role = "frozen"
    needs_labels = False
    distils_features = True

    @dataclass
    class Params:
        summary_weight: float = field(default=1.0, metadata={"ge": 0})
        spatial_weight: float = field(default=1.0, metadata={"ge": 0})
        cosine_weight: float = field(default=0.9, metadata={"ge": 0})
        smooth_l1_weight: float = field(default=0.1, metadata={"ge": 0})
        hidden: Optional[int] = field(default=None, metadata={"ge": 1})
        inner: int = field(default=0, metadata={"ge": 0})
        ce_weight: float = field(default=0.0, metadata={"ge": 0})
        kd_weight: float = field(default=0.0, metadata={"ge": 0})
        temperature: float = field(default=4.0, metadata={"gt": 0})
        student_summary_layer: Optional[str] = None
        student_spatial_layer: Optional[str] = None
        standardize: Literal["none", "channel", "phi-s"] = "none"
        standardize_batches: int = field(default=200, metadata={"ge": 1})

    @classmethod
    def labels_needed(cls, params) -> bool:
        return params.ce_weight > 0

    def __init__(self, student, params, context):
        super().__init__(student, params, context)
        if not context.teacher_targets:
            raise KdscaleError("method 'features' distils teachers' features, but no online teacher gives any: set "
                               "targets: [summary, spatial] on a teacher entry (e.g. teacher.targets=[summary])")
        kinds = sorted({kind for target in context.teacher_targets.values() for kind in target})
        self.student_targets = FeatureTargets(student, kinds, where="student",
                                              spatial_layer=params.student_spatial_layer,
                                              summary_layer=params.student_summary_layer, logits=True)
        student_shapes = self.student_targets.shapes((context.image_size, context.image_size))
        total = sum(context.teacher_weights.get(tid, 1.0) for tid in context.teacher_targets)
        self.feature_weights = {tid: context.teacher_weights.get(tid, 1.0) / total for tid in context.teacher_targets}
        self.adaptors = nn.ModuleDict()
        with torch.random.fork_rng(devices=[]):  # the same heads whatever the teachers' builds drew before
            torch.manual_seed(context.seed)
            for tid, target in context.teacher_targets.items():
                for kind, shape in target.items():
                    width = shape[0]
                    hidden = params.hidden or width
                    self.adaptors[_adaptor_name(tid, kind)] = (
                        MLPAdaptor(student_shapes["summary"][0], hidden, width, params.inner) if kind == "summary"
                        else SpatialAdaptor(student_shapes["spatial"][0], hidden, width, shape[1:], params.inner))
        self._freeze_unreached(context.image_size)
        self.standardizers = nn.ModuleDict(
            {_adaptor_name(tid, kind): TargetStandardizer(shape[0], params.standardize)
             for tid, target in context.teacher_targets.items() for kind, shape in target.items()}
        ) if params.standardize != "none" else None

    def _freeze_unreached(self, image_size: int) -> None:
        """Freezes the student's parameters that no term reaches (found by one backward of a dry
        batch): its classifier when neither ``ce`` nor ``kd`` is on, what follows the spatial map
        when only maps are taught. DDP needs every trained parameter in every backward, and an
        optimizer would only decay them; they stay as built (the export holds them)."""
        student = self.student
        was_training = student.training
        student.eval()
        try:
            logits, features = self.student_targets(torch.zeros(2, 3, image_size, image_size))
            reached = sum(adaptor(features[name.rsplit("_", 1)[1]]).sum() for name, adaptor in self.adaptors.items())
            if self.params.ce_weight > 0 or self.params.kd_weight > 0:
                reached = reached + logits.sum()
            reached.backward()
        finally:
            student.train(was_training)
        unreached = [name for name, p in student.named_parameters() if p.requires_grad and p.grad is None]
        for name, parameter in student.named_parameters():
            parameter.grad = None
            if name in unreached:
                parameter.requires_grad_(False)
        for parameter in self.adaptors.parameters():
            parameter.grad = None
        if unreached:
            log.info(f"method features: no term reaches the student's {', '.join(unreached)} (method.ce_weight and "
                     f"kd_weight are 0, or only maps are taught); frozen as built")

    def feature_statistics(self) -> dict[str, tuple[str, str]]:
        """With ``standardize``: every (teacher, kind) target whose statistics are not gathered yet
        (none after a resume: the standardizers' buffers are in the checkpoint)."""
        if self.standardizers is None:
            return {}
        return {name: tuple(name.rsplit("_", 1)) for name, standardizer in self.standardizers.items()
                if not bool(standardizer.ready)}

    def set_feature_statistics(self, name: str, count: float, total: torch.Tensor, outer: torch.Tensor) -> None:
        tid, kind = name.rsplit("_", 1)
        self.standardizers[name].set_statistics(count, total, outer, where=f"teacher {tid!r} {kind} targets")

    def teacher_needs(self) -> TeacherNeeds:
        return TeacherNeeds(logits=self.params.kd_weight > 0, targets=True)

    def _standardized(self, name: str, target: torch.Tensor) -> torch.Tensor:
        return self.standardizers[name](target) if self.standardizers is not None else target

    def _teacher_targets(self, teacher_output, tid: str, kind: str) -> torch.Tensor:
        target = teacher_output.member_features.get(tid, {}).get(kind) if teacher_output is not None else None
        if target is None:
            raise KdscaleError(f"method 'features': teacher {tid!r} gave no {kind} features for this batch")
        return self._standardized(_adaptor_name(tid, kind), target.detach())

    def forward_train(self, images, targets, teacher_output, phase="all"):
        p = self.params
        logits, student = self.student_targets(images)
        terms = {}
        if p.ce_weight > 0:
            terms["ce"] = p.ce_weight * cross_entropy(logits, targets, self.label_smoothing)
        if p.kd_weight > 0:
            if teacher_output is None or teacher_output.logits is None:
                raise KdscaleError("method.kd_weight > 0 needs a teacher that gives logits: add logits to its targets")
            terms["kd"] = p.kd_weight * soft_kl(teacher_output.logits.detach(), logits, p.temperature)
        for name, adaptor in self.adaptors.items():
            tid, kind = name.rsplit("_", 1)
            weight = self.feature_weights[tid]
            target = self._teacher_targets(teacher_output, tid, kind)
            if kind == "summary":
                terms[f"summary_{tid}"] = p.summary_weight * weight * summary_loss(adaptor(student["summary"]), target)
            else:
                terms[f"spatial_{tid}"] = p.spatial_weight * weight * spatial_loss(
                    adaptor(student["spatial"]), target, p.cosine_weight, p.smooth_l1_weight)
        return logits, terms

    def evaluation_features(self, images, teacher_output=None) -> EvaluationFeatures:
        _, student = self.student_targets(images)
        cosines = {}
        if teacher_output is not None:
            for name, adaptor in self.adaptors.items():
                tid, kind = name.rsplit("_", 1)
                target = teacher_output.member_features.get(tid, {}).get(kind)
                if target is None:  # a replayed teacher has no validation outputs
                    continue
                target = self._standardized(name, target)
                cosine = F.cosine_similarity(adaptor(student[kind]).float(), target.float(), dim=1)
                cosines[tid if kind == "summary" else f"{tid}_spatial"] = cosine.flatten(1).mean(1) \
                    if cosine.dim() > 1 else cosine
        return EvaluationFeatures({"student": student["summary"]} if "summary" in student else {}, cosines)
