"""Single-process training through the Trainer: learning, frozen teachers, resume."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers.common import make_config

from kdscale.checkpoints import list_checkpoints
from kdscale.models import build_model
from kdscale.train.loop import Trainer


@pytest.fixture(scope="module")
def trained_teacher(synth_data, tmp_path_factory):
    """A resnet8 trained alone for 3 epochs; returns its summary."""
    out = str(tmp_path_factory.mktemp("runs"))
    cfg = make_config(synth_data, out, "student.name=resnet8", "train.epochs=3", name="teacher")
    return Trainer(cfg).train()


def test_training_learns_well_above_chance(trained_teacher):
    assert trained_teacher["completed"] and trained_teacher["step"] == 3 * (1600 // 32)
    top1 = trained_teacher["metrics"]["val/student_top1"]
    assert top1 > 50.0, f"10 classes (chance 10%), got {top1:.1f}%"
    assert trained_teacher["metrics"]["val/samples"] == 400
    lines = [json.loads(line) for line in open(os.path.join(trained_teacher["run_dir"], "metrics.jsonl"))]
    train_lines = [entry for entry in lines if "train/loss" in entry]
    assert train_lines[-1]["train/loss"] < train_lines[0]["train/loss"]
    assert {"train/loss_ce", "train/lr", "perf/images_per_s", "perf/data_wait_frac"} <= set(train_lines[0])


def test_kd_keeps_frozen_teacher_bit_identical(trained_teacher, synth_data, tmp_path):
    export = trained_teacher["export"]
    reference = build_model("resnet8", 10, export).state_dict()
    cfg = make_config(synth_data, str(tmp_path), "method.name=kd", "student.name=resnet8",
                      "teacher.name=resnet8", f"teacher.weights={export}", "train.epochs=1", name="kd")
    trainer = Trainer(cfg)
    summary = trainer.train()
    after = trainer.teacher.frozen.model.state_dict()
    assert after.keys() == reference.keys()
    assert all(torch.equal(after[k], reference[k]) for k in reference)  # parameters and BN buffers
    assert all(not p.requires_grad for p in trainer.teacher.frozen.model.parameters())
    optimized = [q for opt in trainer.engine.optimizers.values() for g in opt.param_groups for q in g["params"]]
    assert not any(p is q for p in trainer.teacher.frozen.model.parameters() for q in optimized)
    metrics = summary["metrics"]
    assert metrics["val/teacher_top1"] == pytest.approx(trained_teacher["metrics"]["val/student_top1"])
    assert {"val/student_top1", "val/student_top5", "val/teacher_top5", "val/agreement_top1"} <= set(metrics)
    logged = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    assert any("train/loss_kd" in entry and "train/loss_ce" in entry for entry in logged)


def _final_state(run_dir):
    return torch.load(list_checkpoints(run_dir)[-1], weights_only=True)


def test_resume_matches_uninterrupted_run(synth_data, tmp_path):
    common = ["student.name=resnet8", "train.epochs=2", "optim.milestones=[1.5]", "optim.schedule=multistep",
              "optim.warmup_epochs=0.3", "train.log_every_steps=20"]
    straight = Trainer(make_config(synth_data, str(tmp_path), *common, name="straight")).train()
    first = Trainer(make_config(synth_data, str(tmp_path), *common, "train.stop_after_steps=70",
                                name="stopped")).train()
    assert first["step"] == 70 and not first["completed"]
    resumed = Trainer(make_config(synth_data, str(tmp_path), *common, name="stopped")).train()
    assert resumed["completed"] and resumed["step"] == straight["step"] == 100
    a, b = _final_state(straight["run_dir"]), _final_state(resumed["run_dir"])
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    opt_a, opt_b = a["optimizers"]["all"], b["optimizers"]["all"]
    assert opt_a["param_groups"] == opt_b["param_groups"]  # same lr (schedule position) and settings
    for index, state in opt_a["state"].items():
        assert torch.equal(state["momentum_buffer"], opt_b["state"][index]["momentum_buffer"])
    # The logged history: the same windows at every logged step (the stop at 70 is mid-window).
    logged_a, logged_b = _logged_training(straight["run_dir"]), _logged_training(resumed["run_dir"])
    assert sorted(logged_a) == sorted(logged_b) == list(range(20, 101, 20))
    assert logged_a == logged_b


def _logged_training(run_dir) -> dict[int, dict]:
    """Step -> the logged training metrics but the timings (throughput, data wait, memory)."""
    out = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        entry = json.loads(line)
        if "train/loss" in entry:
            out[entry["step"]] = {k: v for k, v in entry.items() if k.startswith(("train/", "data/"))}
    return out


def test_accumulation_clipping_adamw_label_smoothing(synth_data, tmp_path):
    cfg = make_config(synth_data, str(tmp_path), "student.name=resnet8", "train.grad_accum_steps=2",
                      "train.clip_grad_norm=1.0", "optim.name=adamw", "optim.lr=0.002", "optim.weight_decay=0.05",
                      "train.label_smoothing=0.1", "train.checkpoint_every_steps=10", "train.keep_checkpoints=2",
                      name="accum")
    summary = Trainer(cfg).train()
    assert summary["completed"] and summary["step"] == 1600 // (32 * 2)
    assert [os.path.basename(p) for p in list_checkpoints(summary["run_dir"])] == ["step-00000020.pt",
                                                                                  "step-00000025.pt"]
    assert summary["metrics"]["val/student_top1"] > 20.0


def test_resume_into_another_model_is_a_clear_error(synth_data, tmp_path):
    from kdscale.errors import KdscaleError

    Trainer(make_config(synth_data, str(tmp_path), "student.name=resnet8", "data.train_samples=128",
                        "train.stop_after_steps=2", name="same")).train()
    with pytest.raises(KdscaleError, match=r"checkpoint .*step-00000002.pt does not fit this config's networks"):
        Trainer(make_config(synth_data, str(tmp_path), "student.name=resnet20", "data.train_samples=128", name="same"))


def test_an_in_process_trainer_leaves_no_watchdog_or_lock_behind(synth_data, tmp_path):
    """A watchdog left running would end its host process 15 minutes later; a lock left held
    would refuse the next run on the directory."""
    import threading

    cfg = make_config(synth_data, str(tmp_path), "student.name=resnet8", "train.stop_after_steps=2", name="once")
    trainer = Trainer(cfg)
    trainer.train()
    trainer.close()
    assert not [t for t in threading.enumerate() if t.name == "kdscale-watchdog" and t.is_alive()]
    Trainer(make_config(synth_data, str(tmp_path), "student.name=resnet8", "train.stop_after_steps=3",
                        name="once")).train()  # the same directory: the lock was released
