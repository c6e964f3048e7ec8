"""Multi-process training with real processes: 2 ranks over gloo through accelerate launch."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers.common import ROOT, base_overrides, run_cli

from kdscale.models import build_model

pytestmark = pytest.mark.slow  # real multi-process runs: the full tier only


@pytest.mark.parametrize("method, extra", [
    ("prokt", ["teacher.name=resnet20"]),  # two optimizer phases under DDP
    ("sokd", ["teacher.name=wrn_16_2"]),  # frozen teacher with feature taps + a bridge module
])
def test_two_rank_training(method, extra, synth_data, tmp_path):
    teacher_file = tmp_path / "teacher.pt"
    torch.save(build_model(extra[0].split("=")[1], 10).state_dict(), teacher_file)
    overrides = base_overrides(synth_data, str(tmp_path), name=method) + extra + [
        f"method.name={method}", "student.name=resnet8", f"teacher.weights={teacher_file}",
        "data.train_samples=640", "train.epochs=1", "data.num_workers=1"]
    result = run_cli(["bash", os.path.join(ROOT, "launch", "accelerate.sh"), "-m", "kdscale.train", *overrides],
                     env_extra={"KDSCALE_CPU_PROCS": "2"}, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.load(open(tmp_path / method / "summary.json"))
    assert summary["world_size"] == 2 and summary["completed"]
    assert summary["step"] == 640 // (32 * 2)
    assert summary["ranks_agree"], "ranks ended with different weights"
    assert summary["metrics"]["val/samples"] == 400  # every validation sample once across ranks
