"""Bad input through the real entry point: one clear line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import pytest
import torch
from helpers.common import PYTHON, base_overrides, run_cli

from kdscale.models import build_model


@pytest.fixture(scope="module")
def resnet20_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "resnet20.pt"
    torch.save(build_model("resnet20", 10).state_dict(), path)
    return str(path)


def cases(synth_data, tmp_path, weights):
    kd = ["method.name=kd", "student.name=resnet8"]
    return {
        "missing config": (["--config", str(tmp_path / "none.yaml")], "config file not found: "),
        "unknown key": (["optim.lrr=0.1"], "command-line override optim.lrr: unknown key; did you mean 'optim.lr'?"),
        "wrong type": (["data.batch_size=big"], "data.batch_size: expected int, got 'big'"),
        "unknown model": (["student.name=resnet1000"], "student.name: unknown model 'resnet1000'"),
        "missing teacher": (kd, "method 'kd' needs a frozen teacher: set teacher.name and teacher.weights"),
        "missing checkpoint": (kd + ["teacher.name=resnet20", f"teacher.weights={tmp_path}/gone.pt"],
                               "teacher.weights: weights file not found: "),
        "wrong architecture": (kd + ["teacher.name=resnet8", f"teacher.weights={weights}"],
                               "weights do not fit the model (unexpected: layer1.1.conv1.weight"),
        "no shards": ([f"data.train_shards={tmp_path}/none-*.tar"], "matches no file"),
        "class mismatch": (kd + ["teacher.name=resnet20", "teacher.num_classes=5"],
                           "teacher resnet20 predicts 5 classes but student resnet8 predicts 10"),
    }


@pytest.mark.parametrize("case", ["missing config", "unknown key", "wrong type", "unknown model", "missing teacher",
                                  "missing checkpoint", "wrong architecture", "no shards", "class mismatch"])
def test_bad_input_gives_one_clear_line(case, synth_data, tmp_path, resnet20_weights):
    args, message = cases(synth_data, tmp_path, resnet20_weights)[case]
    base = base_overrides(synth_data, str(tmp_path))
    result = run_cli([PYTHON, "-m", "kdscale.train", *base, *args])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kdscale: error: ") and message in last, result.stderr
