"""Ensemble targets: what a logit method distils when the run has several frozen teachers.

Hinton, Vinyals & Dean 2015 ("Distilling the Knowledge in a Neural Network", Sec. 1 and 3:
distil an ensemble into one model) take the ensemble's soft target as the arithmetic mean of
the members' softened probabilities; the mean of the members' logits is the common
alternative (one softmax of the averaged logits). With the teachers' weights ``w_i``
(``teacher.weight`` of each, normalised to sum to 1 by the trainer, so equal weights keep a
method's own weight, e.g. ``kd_weight``, at its single-teacher scale):

- ``probs`` (default): ``z = T * log(sum_i w_i softmax(z_i / T))``, so that
  ``softmax(z / T) = sum_i w_i softmax(z_i / T)``. Computed in float32 as a log-sum-exp over
  the members of ``log w_i + log_softmax(z_i / T)`` (no probability is formed before the log,
  so none underflows to ``log 0``). Exact for every formula that reads the teacher only
  through ``softmax(z / T)`` at that one ``T``: KD's KL, DKD's binary ``[p_y, 1 - p_y]`` and
  non-target ``p_c / (1 - p_y)`` distributions, DIST's probability matrix, DeiT's soft target
  (and its argmax for hard distillation). ``z`` is not a logit vector of any teacher: its
  z-score means nothing, hence the refusal of logit standardization with ``probs`` below.
- ``logits``: ``z = sum_i w_i z_i``, the weighted mean of the raw logits: the trainer's
  ``TeacherOutput.logits``, recomputed here from ``members`` so hand-built outputs work.
- ``per_teacher`` (kd only, in :mod:`kdscale.methods.kd`): one KD term per teacher,
  ``kd_weight * w_i * T^2 KL(p_i^T || p_S^T)`` (their sum is the weighted mean of the KD terms).

With one teacher (or a hand-built output without ``members``) every form returns
``output.logits`` itself, the same tensor: single-teacher runs are bit-identical to runs
before ensembles existed.

Which methods accept which form (``method.ensemble``):

- ``kd``: ``probs``, ``logits``, ``per_teacher``;
- ``dkd``, ``dist``, ``deit``: ``probs``, ``logits``;
- logit standardization (Sun et al. 2024): ``logits`` (z-score of the mean of the raw logits)
  and, for kd, ``per_teacher`` (each teacher z-scored); ``probs`` with several teachers is
  refused at build time (:func:`refuse_standardized_probs`);
- every other method reads ``TeacherOutput.logits``, the mean of the logits, and the
  features of one teacher (``method.feature_teacher``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from kdscale.errors import KdscaleError
from kdscale.methods.base import MethodContext, TeacherOutput

EnsembleForm = Literal["probs", "logits"]


def mean_of_logits(output: TeacherOutput) -> torch.Tensor:
    """``sum_i w_i z_i`` in float32; the one teacher's ``output.logits`` itself with one (or none)."""
    items = output.member_items()
    if len(items) == 1:
        return output.logits
    return torch.stack([w * z.float() for _, z, w in items]).sum(dim=0)


def ensemble_target_logits(output: TeacherOutput, temperature: float, mode: str = "probs") -> torch.Tensor:
    """Logits ``z`` whose ``softmax(z / temperature)`` is the ensemble target of ``mode``
    (``probs`` or ``logits``, see the module docstring). With one teacher: ``output.logits``,
    the same tensor. Gradients flow to the members; callers detach the result."""
    if mode not in ("probs", "logits"):
        raise ValueError(f"unknown ensemble form {mode!r}; expected 'probs' or 'logits'")
    items = output.member_items()
    if len(items) == 1:
        return output.logits
    if mode == "logits":
        return mean_of_logits(output)
    t = float(temperature)
    # A member of weight 0 adds nothing (and log 0 would be -inf): it is left out.
    log_terms = [math.log(w) + F.log_softmax(z.float() / t, dim=1) for _, z, w in items if w > 0]
    return t * torch.stack(log_terms).logsumexp(dim=0)


def several_teachers(context: MethodContext) -> bool:
    """Whether the run has more than one frozen teacher."""
    return len(context.teacher_ids) > 1


def refuse_standardized_probs(method: str, context: MethodContext, ensemble: str, standardize: bool,
                              fix: str = "method.ensemble=logits") -> None:
    """Raise in one line when logit standardization meets the ``probs`` ensemble of several
    teachers: the z-score needs logits and the probability mean has none. ``fix`` names the
    settings that work (kd adds ``per_teacher``)."""
    if standardize and ensemble == "probs" and several_teachers(context):
        raise KdscaleError(
            f"method {method!r} with {len(context.teacher_ids)} teachers ({', '.join(context.teacher_ids)}): "
            f"method.logit_standardization=true needs each teacher's logits, and method.ensemble=probs "
            f"averages their probabilities: set {fix} (or method.logit_standardization=false)")
