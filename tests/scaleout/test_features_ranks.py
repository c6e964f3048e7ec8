"""The ``features`` method on 2 ranks equals 1 rank (real processes, gloo, CPU), under DDP and
ZeRO-2: the student and its adaptor heads (summary MLP, spatial per-location MLP) train to
the same losses and weights (:func:`kdscale.probes.engine_train.run_train`)."""

from __future__ import annotations

import pytest
from helpers.scaleout import assert_two_ranks_train_as_one, declare

from kdscale.probes.networks import PlainNet

pytestmark = pytest.mark.slow  # real multi-process runs: the full tier only

CASES = {strategy: ("train", strategy, "features") for strategy in ("ddp", "zero2")}
declare((1, 2), *CASES.values())


@pytest.mark.parametrize("strategy", list(CASES))
def test_features_on_two_ranks_match_one_rank(probes, strategy):
    one, two = probes(1, *CASES[strategy])[0], probes(2, *CASES[strategy])
    assert_two_ranks_train_as_one(one, two)
    student_only = sum(p.numel() for p in PlainNet(16).parameters())
    assert one["trainable_parameters"] > student_only  # the adaptor heads train beside the student
