"""Every method's first steps match its pinned loss curve (tests/golden/loss_curves.json,
written by ``python tests/helpers/loss_curves.py --write``): a refactor that changes any term's
value, the step order, an optimizer group or a stop-gradient moves these numbers."""

from __future__ import annotations

import json

import pytest
from helpers.loss_curves import CASES, GOLDEN, loss_curve

REL = 1e-3
"""Three SGD steps amplify the CPU's float rounding (its SIMD kernels and summation order):
dist-tau4 and dkd-ls differ by 1.2e-4 and 9.7e-5 between two x86 machines here. A change of
the math moves a term by far more (the smallest default change pinned so far: 2.6e-1)."""


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_curve_is_pinned(case):
    pinned = json.load(open(GOLDEN))[case]
    got = loss_curve(case)
    assert [sorted(step) for step in got] == [sorted(step) for step in pinned]
    for step, (now, then) in enumerate(zip(got, pinned)):
        for term, value in then.items():
            assert now[term] == pytest.approx(value, rel=REL, abs=1e-6), (step, term)
