"""ProKT never destroys its teacher: on the synthetic task with a converged teacher (at
``method.teacher_lr_scale=0.03``, the setting docs/methods.md gives for converged teachers),
over 3 seeds, through ``kdscale.train``, the teacher's top-1 never falls more than 10 points
below its start, and the student (CE weight 0: it learns from the teacher alone) ends within
1 point of the student trained alone, or above it (means over the seeds). Run with ``-s``
to print the curves that docs/methods.md quotes."""

from __future__ import annotations

import json
import os

import pytest
from helpers.common import base_overrides

from kdscale.data.synth import write_synthetic_shards
from kdscale.train.__main__ import main as train_main

pytestmark = pytest.mark.slow  # real multi-process runs: the full tier only

SEEDS = (0, 1, 2)
EPOCHS = 6


def _run(data: str, out: str, name: str, *extra: str) -> tuple[dict, list[dict]]:
    summary = train_main(base_overrides(data, out, name=name) + [
        "data.image_size=16", "data.batch_size=64", "optim.lr=0.1", "optim.weight_decay=5e-4",
        "train.log_every_steps=25", *extra])
    assert summary["completed"], summary
    history = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    return summary, [entry for entry in history if "val/student_top1" in entry]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("prokt-task"))
    write_synthetic_shards(data, num_classes=10, train_samples=1920, val_samples=640, image_size=16,
                           samples_per_shard=480, difficulty=0.2, seed=11, progress=False)
    out = str(tmp_path_factory.mktemp("prokt-runs"))
    teacher, _ = _run(data, out, "teacher", "method.name=vanilla", "student.name=resnet20", "train.epochs=24")
    return data, out, teacher


def test_prokt_keeps_its_converged_teacher_and_teaches(task):
    data, out, teacher = task
    start = teacher["metrics"]["val/student_top1"]
    assert start > 90, teacher["metrics"]  # a converged teacher
    alone, taught = [], []
    for seed in SEEDS:
        summary, _ = _run(data, out, f"alone-{seed}", "method.name=vanilla", "student.name=resnet8",
                          f"experiment.seed={seed}", f"train.epochs={EPOCHS}")
        alone.append(summary["metrics"]["val/student_top1"])
        summary, history = _run(data, out, f"prokt-{seed}", "method.name=prokt", "student.name=resnet8",
                                "teacher.name=resnet20", f"teacher.weights={teacher['export']}",
                                "method.teacher_init=converged", "method.teacher_lr_scale=0.03",
                                # The code's zeroed student classifier (the default) starts slower: 68.9
                                # vs 70.5 after 6 epochs here (docs/methods.md); this checks teaching itself.
                                "method.zero_student_classifier=false",
                                f"experiment.seed={seed}", f"train.epochs={EPOCHS}")
        teacher_curve = [entry["val/teacher_top1"] for entry in history]
        print(f"seed {seed}: teacher top-1 by epoch {[round(v, 1) for v in teacher_curve]}, student "
              f"{summary['metrics']['val/student_top1']:.1f} (alone {alone[-1]:.1f})")
        assert teacher_curve[0] == pytest.approx(start, abs=0.01)  # evaluated at step 0, before any update
        assert min(teacher_curve) >= start - 10, (seed, teacher_curve)
        taught.append(summary["metrics"]["val/student_top1"])
    assert sum(taught) / len(SEEDS) >= sum(alone) / len(SEEDS) - 1, (taught, alone)
