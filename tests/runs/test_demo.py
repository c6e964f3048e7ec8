"""The demo script itself, end to end: 2 processes through accelerate launch, real
offline wandb runs, a teacher, a KD student, the same student alone, and the figure of
the three (tiny setting, same code path)."""

from __future__ import annotations

import glob
import json
import os

import pytest
from helpers.common import ROOT, run_cli

pytestmark = pytest.mark.slow  # real multi-process runs: the full tier only


def test_demo_script_end_to_end(tmp_path):
    data, out = tmp_path / "data", tmp_path / "runs"
    env = {"KDSCALE_DEMO_SCALE": "tiny", "KDSCALE_DEMO_DATA": str(data), "KDSCALE_DEMO_OUT": str(out),
           "WANDB_MODE": "offline"}
    env.pop("WANDB_API_KEY", None)
    result = run_cli(["bash", os.path.join(ROOT, "launch", "demo.sh")], env_extra=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert (data / "index.json").is_file()
    summaries = {}
    for name in ("demo-teacher", "demo-kd", "demo-student"):
        summary = json.load(open(out / name / "summary.json"))
        summaries[name] = summary
        assert summary["completed"] and summary["world_size"] == 2
        assert summary["metrics"]["val/samples"] == 256  # exact pass over both ranks
        assert os.path.isfile(summary["export"]) and os.path.isfile(summary["checkpoint"])
        runs = glob.glob(str(out / name / "wandb" / "offline-run-*" / "run-*.wandb"))
        assert len(runs) == 1 and os.path.getsize(runs[0]) > 0
    teacher_top1 = summaries["demo-teacher"]["metrics"]["val/student_top1"]
    # Both ranks evaluate with rank 0's weights and BN statistics, so the teacher scores the same
    # in its own run and as the frozen teacher of the KD run.
    assert summaries["demo-kd"]["metrics"]["val/teacher_top1"] == teacher_top1
    # The student alone trains the KD student's network for as many steps, with no teacher.
    assert summaries["demo-student"]["step"] == summaries["demo-kd"]["step"]
    assert "val/teacher_top1" not in summaries["demo-student"]["metrics"]
    table = [line for line in result.stdout.splitlines() if line.startswith("| demo-")]
    assert [line.split("|")[1:4] for line in table] == [
        [" demo-teacher ", " vanilla ", " resnet20 (alone)    "],
        [" demo-kd      ", " kd      ", " resnet8 <- resnet20 "],
        [" demo-student ", " vanilla ", " resnet8 (alone)     "]], result.stdout[-3000:]
    figure = out / "demo-compare.png"
    assert figure.is_file() and figure.stat().st_size > 0
    assert f"(kdscale compare --plot): {figure}" in result.stdout
    assert "wandb sync " in result.stdout
