"""``launch/reproduce.sh cifar100 --tiny``, as CI runs it: the whole pipeline (data, both
teachers, every CIFAR-100 method config through kdscale sweep, the grouped table) on a
small synthetic set; then a rerun resumes nothing and skips every finished run."""

from __future__ import annotations

import os
import subprocess

import pytest
from helpers.common import ROOT

pytestmark = pytest.mark.slow  # about twenty real (tiny) training runs


def test_reproduce_tiny_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "reproduce"
    command = ["bash", os.path.join(ROOT, "launch", "reproduce.sh"), "cifar100", "--tiny", "--seeds", "0",
               "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for method in ("kd", "at", "dml", "ctkd", "prokt", "ffl", "ffcl", "sokd", "dkd", "dist"):
        assert any(name.startswith(method) and name.endswith("-s0") for name in os.listdir(out)), method
    rows = [line for line in result.stdout.splitlines() if "resnet8x4" in line and "resnet32x4" in line]
    assert any("73.33" in row for row in rows), result.stdout[-3000:]  # RepDistiller's KD figure in the table
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("already completed") >= 10, again.stdout[-2000:]
