"""The resume policy of :class:`kdscale.checkpoints.Checkpointer` for another number of
processes: the global batch is kept by the accumulation, or the resume is refused in one
line naming settings that keep it; a ZeRO checkpoint names what to do instead. The runs
that exercise it end to end (8 -> 4 -> 1 processes) are in tests/scaleout/test_scale.py."""

from __future__ import annotations

import pytest

from kdscale.checkpoints import Checkpointer
from kdscale.config import load_config
from kdscale.errors import KdscaleError


def saved(batch: int, accum: int, world: int) -> dict:
    return {"world_size": world, "config": {"data": {"batch_size": batch}, "train": {"grad_accum_steps": accum}}}


@pytest.mark.parametrize("batch, accum, world, now_batch, now_world, expected", [
    (2, 1, 8, 2, 4, 2),  # 8 -> 4 processes: accumulate 2
    (2, 1, 8, 2, 1, 8),  # 8 -> 1
    (4, 2, 2, 4, 4, 1),  # 2 -> 4: the accumulation falls back to 1
    (4, 1, 4, 2, 4, 2),  # the per-process batch halved by hand: accumulate 2
    (8, 1, 2, 8, 2, 1),  # same world: unchanged
])
def test_another_world_size_keeps_the_global_batch(batch, accum, world, now_batch, now_world, expected):
    cfg = load_config(None, [f"data.batch_size={now_batch}"])
    Checkpointer.keep_global_batch(cfg, "ckpt", saved(batch, accum, world), now_world)
    assert cfg.train.grad_accum_steps == expected
    assert cfg.data.batch_size * now_world * cfg.train.grad_accum_steps == batch * accum * world


def test_a_global_batch_that_no_accumulation_keeps_is_refused_with_settings_that_do():
    cfg = load_config(None, ["data.batch_size=8"])
    with pytest.raises(KdscaleError) as refused:  # 16 = 8 x 2 x 1 cannot be 8 x 4 x k
        Checkpointer.keep_global_batch(cfg, "run/checkpoints/step-00000003.pt", saved(8, 1, 2), 4)
    message = str(refused.value)
    assert "\n" not in message and "global batch of 16" in message
    assert "set data.batch_size=4 train.grad_accum_steps=1" in message
    assert cfg.train.grad_accum_steps == 1  # nothing changed


def test_zero_checkpoint_on_another_world_size_names_the_way_out(tmp_path):
    import torch

    step = tmp_path / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    torch.save({"kdscale_checkpoint": 1, "step": 4, "strategy": "zero2", "world_size": 8}, step / "meta.pt")
    with pytest.raises(KdscaleError) as refused:
        Checkpointer.newest(str(tmp_path), "zero2", 4, resumes_on_any_world_size=False)
    message = str(refused.value)
    assert "resume on 8 processes" in message and f"kdscale checkpoint consolidate {tmp_path}" in message
    assert Checkpointer.newest(str(tmp_path), "zero2", 8, resumes_on_any_world_size=False)[0] == str(step)
