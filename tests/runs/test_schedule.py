"""The learning-rate schedule (``lr_at``) against values written out from its formulas:
linear warm-up from lr/W to lr over the first W = warmup_epochs x steps_per_epoch optimizer
steps, then multistep (lr x gamma^(milestones passed, in epochs)), cosine (from lr at the
end of warm-up to min_lr at total_steps) or constant. Steps are 0-based; the last step of
a run is total_steps - 1."""

from __future__ import annotations

import math

import pytest
import torch

from kdscale.config.schema import OptimSection
from kdscale.runtime.optim import lr_at, set_lr

HALF_SQRT2 = math.sqrt(2) / 2


def schedule(optim: OptimSection, steps_per_epoch: int, epochs: int) -> list[float]:
    return [lr_at(step, steps_per_epoch, steps_per_epoch * epochs, optim) for step in range(steps_per_epoch * epochs)]


def test_cosine_without_warmup():
    # 4 steps: progress 0, 1/4, 1/2, 3/4 of the half cosine from 0.2 down to 0.02
    optim = OptimSection(lr=0.2, schedule="cosine", min_lr=0.02)
    expected = [0.02 + 0.18 * f for f in (1.0, (1 + HALF_SQRT2) / 2, 0.5, (1 - HALF_SQRT2) / 2)]
    assert schedule(optim, steps_per_epoch=2, epochs=2) == pytest.approx(expected, rel=1e-12)
    # past the end (never trained, but a resumed run with a longer schedule reads it): the floor
    assert lr_at(4, 2, 4, optim) == pytest.approx(0.02) and lr_at(9, 2, 4, optim) == pytest.approx(0.02)


def test_cosine_with_warmup():
    # 10 steps per epoch, 5 epochs: 10 warm-up steps, then 40 cosine steps
    optim = OptimSection(lr=0.1, schedule="cosine", warmup_epochs=1, min_lr=0.0)
    lrs = schedule(optim, steps_per_epoch=10, epochs=5)
    assert lrs[0] == pytest.approx(0.01)  # step 0: lr / W, never 0
    assert lrs[:10] == pytest.approx([0.01 * k for k in range(1, 11)])  # linear, reaching lr at W - 1
    assert lrs[9] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.1)  # the end of warm-up: the peak
    assert lrs[30] == pytest.approx(0.05)  # half way through the cosine: (lr + min_lr) / 2
    assert lrs[20] == pytest.approx(0.05 * (1 + HALF_SQRT2))  # a quarter of the way
    assert lrs[49] == pytest.approx(0.05 * (1 + math.cos(math.pi * 39 / 40)))  # the last step, just above min_lr
    assert lrs[49] == pytest.approx(0.1 * math.sin(math.pi / 80) ** 2)  # the same, by the half-angle identity
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # non-increasing after warm-up


def test_fractional_warmup_epochs():
    # 0.5 epoch of 8 steps: W = 4
    optim = OptimSection(lr=0.4, schedule="constant", warmup_epochs=0.5)
    assert schedule(optim, steps_per_epoch=8, epochs=2) == pytest.approx([0.1, 0.2, 0.3, 0.4] + [0.4] * 12)
    # 0.25 epoch of 10 steps: W = 2.5
    optim = OptimSection(lr=1.0, schedule="constant", warmup_epochs=0.25)
    assert [lr_at(s, 10, 20, optim) for s in (0, 1, 3, 19)] == pytest.approx([0.4, 0.8, 1.0, 1.0])


def test_fractional_warmup_never_exceeds_the_peak():
    optim = OptimSection(lr=1.0, schedule="constant", warmup_epochs=0.25)
    assert max(lr_at(s, 10, 20, optim) for s in range(20)) <= 1.0


def test_multistep_with_fractional_milestones_and_warmup():
    # 4 steps per epoch, 5 epochs; milestones at epochs 2 and 3.5 (steps 8 and 14); warm-up 0.5 epoch (W = 2)
    optim = OptimSection(lr=0.1, schedule="multistep", milestones=[2, 3.5], gamma=0.2, warmup_epochs=0.5)
    lrs = schedule(optim, steps_per_epoch=4, epochs=5)
    expected = [0.05, 0.1] + [0.1] * 6 + [0.02] * 6 + [0.004] * 6
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.004)


def test_multistep_without_milestones_and_constant_are_flat():
    for optim in (OptimSection(lr=0.3, schedule="multistep"), OptimSection(lr=0.3, schedule="constant")):
        assert schedule(optim, steps_per_epoch=3, epochs=3) == [0.3] * 9


def test_set_lr_scales_each_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a], "lr_scale": 1.0}, {"params": [b], "lr_scale": 0.03}], lr=1.0)
    set_lr(optimizer, 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 0.015])
