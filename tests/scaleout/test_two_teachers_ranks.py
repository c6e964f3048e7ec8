"""Two frozen teachers on 2 ranks equal 1 rank (real processes, gloo, CPU): the probe's
second teacher has its own view and is ZeRO-3-partitioned on 2 ranks (replicated on 1), under
DDP and ZeRO-2 students (:func:`kdscale.probes.engine_train.two_teachers`)."""

from __future__ import annotations

import pytest
from helpers.scaleout import assert_two_ranks_train_as_one, declare

pytestmark = pytest.mark.slow  # real multi-process runs: the full tier only

CASES = {strategy: ("train", strategy, "kd", "teachers=2") for strategy in ("ddp", "zero2")}
declare((1, 2), *CASES.values(), ("train", "ddp", "kd"))


@pytest.mark.parametrize("strategy", list(CASES))
def test_two_teachers_on_two_ranks_match_one_rank(probes, strategy):
    one, two = probes(1, *CASES[strategy])[0], probes(2, *CASES[strategy])
    assert_two_ranks_train_as_one(one, two)
    # The second teacher counts: the same run with the first teacher alone differs.
    alone = probes(1, "train", "ddp", "kd")[0]["losses"]
    assert abs(alone[0] - one["losses"][0]) > 1e-4
