"""The ProKT teacher-stability figures of docs/methods.md: a converged resnet20 teacher on
the synthetic task of tests/methods/test_prokt_stability.py, then 6 epochs of ProKT (resnet8
student) per setting of ``method.target_bn``, ``method.teacher_lr_scale``,
``method.zero_student_classifier`` and ``train.clip_grad_norm`` (seed 0), printing the
teacher's and the student's top-1 after each epoch, and the student trained alone.

    .venv/bin/python tests/helpers/prokt_study.py [OUT_DIR]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from helpers.common import base_overrides  # noqa: E402
from kdscale.data.synth import write_synthetic_shards  # noqa: E402
from kdscale.train.__main__ import main as train_main  # noqa: E402

# (target_bn, teacher_lr_scale, zero_student_classifier, clip_grad_norm): the first five as
# measured before the code's student zeroing and clipping became defaults, then the code's forms.
SETTINGS = [("batch", 0.03, False, None), ("running", 0.03, False, None), ("batch", 0.1, False, None),
            ("batch", 0.3, False, None), ("running", 0.3, False, None),
            ("batch", 0.03, True, None), ("batch", 0.03, True, 1.0), ("running", 0.03, True, 1.0),
            ("batch", 0.3, True, 1.0), ("running", 0.3, True, 1.0)]


def run(data: str, out: str, name: str, *extra: str) -> tuple[dict, list]:
    summary = train_main(base_overrides(data, out, name=name) + [
        "data.image_size=16", "data.batch_size=64", "optim.lr=0.1", "optim.weight_decay=5e-4",
        "train.log_every_steps=25", *extra])
    history = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    return summary, [(round(h.get("val/teacher_top1", -1), 1), round(h["val/student_top1"], 1))
                     for h in history if "val/student_top1" in h]


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="prokt-study-")
    data = os.path.join(out, "data")
    write_synthetic_shards(data, num_classes=10, train_samples=1920, val_samples=640, image_size=16,
                           samples_per_shard=480, difficulty=0.2, seed=11, progress=False)
    teacher, _ = run(data, out, "teacher", "method.name=vanilla", "student.name=resnet20", "train.epochs=24")
    print(f"converged teacher: {teacher['metrics']['val/student_top1']:.1f}", flush=True)
    _, alone = run(data, out, "alone", "method.name=vanilla", "student.name=resnet8", "train.epochs=6")
    print(f"student alone: top-1 by epoch {[s for _, s in alone]}", flush=True)
    for target_bn, scale, zero_student, clip in SETTINGS:
        name = f"prokt-{target_bn}-{scale}-{'zero' if zero_student else 'init'}-{clip}"
        _, curve = run(data, out, name, "method.name=prokt", "student.name=resnet8",
                       "teacher.name=resnet20", f"teacher.weights={teacher['export']}", "method.teacher_init=converged",
                       f"method.target_bn={target_bn}", f"method.teacher_lr_scale={scale}",
                       f"method.zero_student_classifier={str(zero_student).lower()}",
                       f"train.clip_grad_norm={'null' if clip is None else clip}", "train.epochs=6")
        print(f"target_bn={target_bn} teacher_lr_scale={scale} zero_student_classifier={zero_student} "
              f"clip_grad_norm={clip}: (teacher, student) top-1 by epoch {curve}", flush=True)


if __name__ == "__main__":
    main()
