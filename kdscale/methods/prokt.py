"""``prokt``: progressive knowledge teaching, Shi, Song, Zhou, Li & Li, "Follow Your Path:
a Progressive Method for Knowledge Distillation", ECML-PKDD 2021 (arXiv:2107.09305; code:
github wxsh1213/prokt_text, a BERT text classifier).

The teacher is projected into the student's reach: it trains too, pulled toward targets
the student can follow. Each iteration, in the order of the authors' code:

1. the student, without gradients, gives ``sg(z_S)``;
2. teacher step: ``L_T = (1 - lam) * CE(z_T, y) + lam * KL(p_S || p_T)``  (verified);
3. the *updated* teacher, without gradients, gives ``sg(z_T)``;
4. student step: ``L_S = kl_weight * KL(p_T || p_S) + ce_weight * CE(z_S, y)``, with
   ``ce_weight = 0`` as in the code (verified).

Two optimizer steps per iteration (phases ``teacher`` then ``student``); the trainer
steps between them, so step 3 sees the updated teacher. KL terms at ``T = 1`` (verified).

Choices, each configurable:
- ``target_bn: batch`` (default, inferred): the no-grad forwards of steps 1 and 3 run with
  dropout off and BatchNorm normalising with the **batch's** statistics, without updating
  the running ones. The authors' code takes them in eval mode (``target_bn: running``),
  but it is a BERT: LayerNorm has no running statistics, so there eval mode only turns
  dropout off. In a BN network that is still untrained, eval mode normalises with running
  statistics still near their initial values, and its outputs are far from what the
  network computes in training. An audit saw a converged teacher pulled from 99% to 11%
  top-1 with eval-mode targets at a 0.3x teacher lr on a small real dataset. On kdscale's
  synthetic task (``tests/helpers/prokt_study.py``, a 90.8% resnet20 teacher, seed 0) eval-mode
  targets at 0.3x gave the deepest dip (to 75.0% after the first epoch), batch statistics
  83.0%; the figures are in docs/methods.md.
- ``teacher_lr_scale = 0.1`` (inferred): the teacher's lr is the scheduled lr times this.
  The code uses AdamW with 3e-5 for the teacher and 1e-4 for the student (0.3x); under SGD
  with momentum the first epoch's dip grows with this scale. For a converged teacher use
  0.03: over 3 seeds its top-1 stayed within 9 points of its start
  (``tests/methods/test_prokt_stability.py``).
- ``lam = 0.35`` (published 0.3-0.4).
- ``teacher_init`` (the code starts from generic pre-trained ``bert-base-uncased``, not
  fine-tuned on the task, with ``--init_classifier_to_zero``): ``generic`` (default)
  loads ``teacher.weights`` and replaces the classifier (the last ``nn.Linear``) with a
  fresh one for this task's classes, zeroed when ``zero_classifier``; ``converged`` uses
  ``teacher.weights`` as they are; ``scratch`` trains the teacher from random weights
  (``teacher.weights`` must be unset; ``zero_classifier`` applies).
- ``zero_student_classifier: true`` (verified: ``run_glue_milestone.py`` builds the student's
  and the teacher's training arguments from one command line, so ``--init_classifier_to_zero``
  zeroes the student's classifier too, ``init_classifier_as_zero(model_s)``): the student's last
  ``nn.Linear`` starts at zero. ``false`` keeps the student's own initialisation.
- Gradient clipping (verified: the code clips each network's gradient norm on its own at the
  HF trainer's ``max_grad_norm``, 1.0, before each of the two optimizer steps): kdscale clips
  each phase's parameters on their own with ``train.clip_grad_norm``, which the shipped ProKT
  configs set to 1.0 (null: no clipping).
- ``dual: true``: the code's mirror-descent variant, ``L_T = CE + beta * (KL - eps)`` with
  ``beta <- max(0, beta + dual_lr * (KL - eps))`` after each teacher forward (defaults
  ``dual_lr = 1e-3``, ``eps = 1``, ``beta0 = 1``, as in the code). Under DDP every rank
  keeps rank 0's ``beta`` (buffers are broadcast each forward).
Requires ``train.grad_accum_steps = 1``.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from kdscale.errors import KdscaleError
from kdscale.methods.base import Distiller, Phase, register_method
from kdscale.methods.losses import cross_entropy, soft_kl


@contextlib.contextmanager
def batch_statistics_without_update(network: nn.Module):
    """Dropout off, BatchNorm on the batch's statistics, running statistics untouched."""
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = network.training
    tracked = [m.track_running_stats for m in norms]
    network.eval()
    for m in norms:
        m.train()
        m.track_running_stats = False  # normalise with the batch's statistics, update nothing
    try:
        yield
    finally:
        for m, flag in zip(norms, tracked):
            m.track_running_stats = flag
        network.train(was_training)


@contextlib.contextmanager
def eval_mode(network: nn.Module):
    was_training = network.training
    network.eval()
    try:
        yield
    finally:
        network.train(was_training)


def replace_classifier(network: nn.Module, num_classes: int, zero: bool) -> None:
    """Put a fresh ``nn.Linear`` with ``num_classes`` outputs where the last one was."""
    linears = [(name, m) for name, m in network.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise KdscaleError(f"method.teacher_init: {type(network).__name__} has no nn.Linear classifier to replace; "
                           f"use method.teacher_init=converged")
    name, old = linears[-1]
    head = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    if zero:
        nn.init.zeros_(head.weight)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
    parent = network.get_submodule(name.rpartition(".")[0]) if "." in name else network
    setattr(parent, name.rpartition(".")[2], head)


def zero_classifier_(network: nn.Module, key: str) -> None:
    """Zero the weight and bias of ``network``'s last ``nn.Linear`` in place."""
    linears = [m for m in network.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise KdscaleError(f"{key}: {type(network).__name__} has no nn.Linear classifier to zero; set {key}=false")
    with torch.no_grad():
        linears[-1].weight.zero_()
        if linears[-1].bias is not None:
            linears[-1].bias.zero_()


@register_method
class ProKT(Distiller):
    name = "prokt"
    paper = "Shi et al. 2021, progressive knowledge teaching"
    description = "Progressive KD: the teacher trains toward what the student can reach; two steps per iteration."
    teacher_role = "trainable"

    @dataclass
    class Params:
        lam: float = field(default=0.35, metadata={"ge": 0, "le": 1})
        temperature: float = field(default=1.0, metadata={"gt": 0})
        kl_weight: float = field(default=1.0, metadata={"ge": 0})
        ce_weight: float = field(default=0.0, metadata={"ge": 0})
        teacher_lr_scale: float = field(default=0.1, metadata={"ge": 0})
        target_bn: Literal["batch", "running"] = "batch"
        teacher_init: Literal["generic", "converged", "scratch"] = "generic"
        zero_classifier: bool = True
        zero_student_classifier: bool = True
        dual: bool = False
        dual_eps: float = field(default=1.0, metadata={"ge": 0})
        dual_lr: float = field(default=1e-3, metadata={"ge": 0})
        dual_beta0: float = field(default=1.0, metadata={"ge": 0})

    def __init__(self, student, params, context):
        super().__init__(student, params, context)
        self.teacher = context.trained_teacher.requires_grad_(True)
        if params.teacher_init == "scratch" and context.teacher_pretrained:
            raise KdscaleError("method.teacher_init=scratch trains the teacher from random weights, but "
                               "teacher.weights is set; remove teacher.weights or use method.teacher_init=converged")
        if params.teacher_init != "scratch" and not context.teacher_pretrained:
            warnings.warn(f"method.teacher_init={params.teacher_init} but teacher.weights is not set: the teacher "
                          f"starts from random weights", stacklevel=2)
        if params.teacher_init == "generic" or (params.teacher_init == "scratch" and params.zero_classifier):
            replace_classifier(self.teacher, context.num_classes, params.zero_classifier)
        if params.zero_student_classifier:
            zero_classifier_(student, "method.zero_student_classifier")
        self.register_buffer("dual_beta", torch.tensor(float(params.dual_beta0)))

    def phases(self):
        return {"teacher": Phase(self.teacher, lr_scale=self.params.teacher_lr_scale), "student": Phase(self.student)}

    def target_logits(self, network: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The other network's logits as a target (no gradient), per ``target_bn``."""
        mode = batch_statistics_without_update if self.params.target_bn == "batch" else eval_mode
        with torch.no_grad(), mode(network):
            return network(images)

    def forward_train(self, images, targets, teacher_output, phase="all"):
        p = self.params
        if phase == "teacher":
            student_logits = self.target_logits(self.student, images)
            teacher_logits = self.teacher(images)
            ce = cross_entropy(teacher_logits, targets, self.label_smoothing)
            kl = soft_kl(student_logits, teacher_logits, p.temperature)
            if not p.dual:
                return teacher_logits, {"teacher_ce": (1 - p.lam) * ce, "teacher_kl": p.lam * kl}
            gap = kl - p.dual_eps
            terms = {"teacher_ce": ce, "teacher_dual": self.dual_beta.clone() * gap}
            with torch.no_grad():
                self.dual_beta.copy_((self.dual_beta + p.dual_lr * gap.detach()).clamp_min(0.0))
            return teacher_logits, terms
        if phase == "student":
            teacher_logits = self.target_logits(self.teacher, images)
            logits = self.student(images)
            return logits, {"kd": p.kl_weight * soft_kl(teacher_logits, logits, p.temperature),
                            "ce": p.ce_weight * cross_entropy(logits, targets, self.label_smoothing)}
        raise ValueError(f"prokt steps in two phases, 'teacher' then 'student'; got phase {phase!r}")

    def evaluation_logits(self, images, teacher_output=None):
        return {"student": self.student(images), "teacher": self.teacher(images)}
