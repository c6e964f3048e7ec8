"""CRD written out from RepDistiller's formulas in plain Python floats (float64), one sample
and one bank row at a time: the golden values kdscale's batched, sharded version must match.

Formulas (RepDistiller ``crd/memory.py`` ``ContrastMemory.forward``, ``crd/criterion.py``
``ContrastLoss``): for anchor embedding ``v`` of sample ``b`` and column ``k`` of its
contrast indices (column 0: the positive), ``out[b][k] = exp(<M[c_bk], v_b> / T)``;
``Z = mean(out) * N`` on the first call, then fixed; ``P = out / Z``;
``loss = -(sum_b log(P_b0 / (P_b0 + m/N + 1e-7)) + sum_b sum_{k>=1} log((m/N) / (P_bk + m/N + 1e-7))) / B``
with ``m`` the number of negatives; student anchors score against the teacher's bank and the
reverse; afterwards ``M[i_b] = normalise(0.5 M[i_b] + 0.5 v_b)`` for the sample's own row.
"""

from __future__ import annotations

import math


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def contrast_loss(probabilities, dataset_size):
    negatives = len(probabilities[0]) - 1
    noise = negatives / dataset_size
    total = 0.0
    for row in probabilities:
        total += math.log(row[0] / (row[0] + noise + 1e-7))
        for p in row[1:]:
            total += math.log(noise / (p + noise + 1e-7))
    return -total / len(probabilities)


def crd_step(bank_student, bank_teacher, v_student, v_teacher, contrast, z, temperature, momentum):
    """One step: (loss_student_anchor + loss_teacher_anchor, z pair, new banks). ``bank_*``:
    lists of rows (N x D), ``v_*``: B x D, ``contrast``: B x (K + 1) indices, ``z``: None on the
    first step, else the pair the first step returned."""
    size = len(bank_student)
    out_s = [[math.exp(_dot(bank_teacher[c], v_student[b]) / temperature) for c in row]
             for b, row in enumerate(contrast)]
    out_t = [[math.exp(_dot(bank_student[c], v_teacher[b]) / temperature) for c in row]
             for b, row in enumerate(contrast)]
    if z is None:
        count = sum(len(row) for row in out_s)
        z = (sum(map(sum, out_s)) / count * size, sum(map(sum, out_t)) / count * size)
    loss = contrast_loss([[o / z[0] for o in row] for row in out_s], size) + \
        contrast_loss([[o / z[1] for o in row] for row in out_t], size)
    new_student, new_teacher = [list(r) for r in bank_student], [list(r) for r in bank_teacher]
    for b, row in enumerate(contrast):
        i = row[0]
        for bank, old, v in ((new_student, bank_student, v_student), (new_teacher, bank_teacher, v_teacher)):
            mixed = [old[i][d] * momentum + v[b][d] * (1 - momentum) for d in range(len(v[b]))]
            norm = math.sqrt(sum(x * x for x in mixed))
            bank[i] = [x / norm for x in mixed]
    return loss, z, new_student, new_teacher
