"""``train.compile``: compiled networks train and give the eager run's losses (to float
rounding), keep their parameter names, and an impossible combination fails before start."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers.common import make_config

from kdscale.errors import KdscaleError
from kdscale.train.loop import Trainer


def losses_of(synth_data, out_dir, compile_setting: str, method: str = "at") -> tuple[list[dict], Trainer]:
    torch.manual_seed(3)
    cfg = make_config(synth_data, str(out_dir), f"method.name={method}", "student.name=resnet8",
                      "teacher.name=resnet20", "data.train_samples=128", "data.batch_size=16",
                      "train.stop_after_steps=4", "train.log_every_steps=1", "train.checkpoint_every_steps=0",
                      f"train.compile={compile_setting}", name=f"compile-{compile_setting}")
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    lines = [json.loads(line) for line in open(os.path.join(cfg.run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in line.items() if k.startswith("train/loss")} for line in lines if "train/loss" in line], \
        trainer


@pytest.mark.slow  # compiling on a 2-core CPU takes a minute
def test_compiled_run_matches_eager_losses(synth_data, tmp_path):
    eager, _ = losses_of(synth_data, tmp_path, "none")
    compiled, trainer = losses_of(synth_data, tmp_path, "all")
    assert len(eager) == len(compiled) == 4
    for step, (a, b) in enumerate(zip(eager, compiled), start=1):
        assert a.keys() == b.keys() and "train/loss_at" in a  # the teacher's taps still fire when compiled
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-5), (step, key)
    assert trainer.distiller.student._compiled_call_impl is not None
    assert trainer.teacher.frozen.model._compiled_call_impl is not None
    assert all(not k.startswith("_orig_mod") for k in trainer.distiller.state_dict())  # names unchanged


def test_compiled_zero3_teacher_is_refused(synth_data, tmp_path):
    cfg = make_config(synth_data, str(tmp_path), "method.name=kd", "student.name=resnet8", "teacher.name=resnet8",
                      "train.compile=teacher", "distributed.teacher_sharding=zero3")
    with pytest.raises(KdscaleError, match="train.compile=teacher compiles the frozen teacher"):
        Trainer(cfg)


def test_compiled_networks_under_zero3_are_refused(synth_data, tmp_path):
    cfg = make_config(synth_data, str(tmp_path), "method.name=kd", "student.name=resnet8", "teacher.name=resnet8",
                      "train.compile=networks", "distributed.strategy=zero3")
    with pytest.raises(KdscaleError, match="train.compile=networks compiles the trained networks, which "
                                           "distributed.strategy=zero3 partitions"):
        Trainer(cfg)
