"""``bash launch/gpu-check.sh --dry-run``: the GPU check's parts on the CPU at tiny sizes, so
that the one prepared command still works when a GPU is lent for a few minutes."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers.common import ROOT

pytestmark = pytest.mark.slow  # the correctness tests and a benchmark section, end to end


def test_gpu_check_dry_run_writes_its_report(tmp_path):
    out = tmp_path / "gpu-check"
    result = subprocess.run(["bash", os.path.join(ROOT, "launch", "gpu-check.sh"), "--dry-run", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.load(open(out / "gpu-check.json"))
    assert report["dry_run"] and [p["part"] for p in report["parts"]] == ["correctness", "figures"]
    assert all(p["status"] == "passed" for p in report["parts"]), report["parts"]
    log = open(out / "correctness.log").read()
    assert "8 passed, 1 skipped" in log, log[-2000:]  # the gpu tests ran on the CPU (compile: tests/gpu/test_compile.py)
    assert report["environment"]["torch"] and "online_kd_vs_student_only" in report["ratios"]
    assert report["ratios"]["decode_gpu_vs_cpu"]["median"] > 0  # data.decode=cpu vs gpu, by training
    markdown = (out / "gpu-check.md").read_text()
    assert "| correctness | passed |" in markdown and "total" in result.stdout


def test_gpu_check_refuses_a_machine_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = subprocess.run(["bash", os.path.join(ROOT, "launch", "gpu-check.sh"), str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "no CUDA device here" in result.stderr and "Traceback" not in result.stderr
