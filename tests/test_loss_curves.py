"""Every method's first steps match its pinned loss curve (tests/golden/loss_curves.json,
written by ``python tests/loss_curves.py --write``): a refactor that changes any term's
value, the step order, an optimizer group or a stop-gradient moves these numbers."""

from __future__ import annotations

import json

import pytest

from loss_curves import CASES, GOLDEN, loss_curve


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_curve_is_pinned(case):
    pinned = json.load(open(GOLDEN))[case]
    got = loss_curve(case)
    assert [sorted(step) for step in got] == [sorted(step) for step in pinned]
    for step, (now, then) in enumerate(zip(got, pinned)):
        for term, value in then.items():
            assert now[term] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, term)
