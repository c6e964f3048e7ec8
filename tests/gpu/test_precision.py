"""Mixed precision where CPUs can show it: bf16 autocast through the methods that feed teacher
features into trained modules, and DeepSpeed's engines told the run's autocast."""

from __future__ import annotations

import pytest
import torch
from helpers.common import make_config
from torch import nn

from kdscale.config import load_config
from kdscale.engines.deepspeed_config import build_deepspeed_config
from kdscale.teachers.frozen import zero3_teacher_config
from kdscale.train.loop import Trainer


def test_deepspeed_configs_carry_the_runs_autocast():
    """DeepSpeed's engine turns autocast off inside its forward unless its config has a
    ``torch_autocast`` section (CUDA only shows it): kdscale writes one from train.precision,
    with no module reducing gradients in bf16."""
    cfg = load_config(None, ["data.batch_size=4"])
    on = build_deepspeed_config(cfg, stage=2, world_size=1, autocast_dtype=torch.bfloat16)["torch_autocast"]
    assert on == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert build_deepspeed_config(cfg, stage=2, world_size=1)["torch_autocast"] == {"enabled": False}
    assert zero3_teacher_config(4, torch.bfloat16)["torch_autocast"]["enabled"] is True


@pytest.mark.slow  # DeepSpeed in this process
def test_deepspeed_engine_forward_keeps_bf16_and_fp32_gradient_reduction():
    import deepspeed

    from kdscale.parallel.context import DistContext

    DistContext.from_env().ensure_process_group()

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.seen = None

        def forward(self, x):
            self.seen = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
            return self.fc(x)

    model = Probe()
    config = build_deepspeed_config(load_config(None, ["data.batch_size=2"]), stage=2, world_size=1,
                                    autocast_dtype=torch.bfloat16)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      config=config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = engine(torch.randn(2, 4))
    assert model.seen == (True, torch.bfloat16) and out.dtype == torch.bfloat16
    assert not any(hasattr(p, "comm_dtype") for p in model.parameters())  # gradients reduced in fp32


@pytest.mark.slow  # five short runs under CPU bf16 autocast
@pytest.mark.parametrize("method, teacher, extra", [
    ("sokd", "wrn_16_2", []), ("reviewkd", "resnet20", ["method.warmup_epochs=0"]), ("fitnet", "resnet20", []),
    ("crd", "resnet20", ["method.nce_k=32", "method.feat_dim=16"]), ("ctkd", "resnet20", []),
])
def test_methods_feeding_teacher_features_run_under_bf16(synth_data, tmp_path, method, teacher, extra):
    """A few steps and one validation with bf16 autocast: the frozen teacher's features come
    out bf16 and reach trained modules (SOKD's bridge, CRD's heads, ...) without a dtype error."""
    cfg = make_config(synth_data, str(tmp_path), f"method.name={method}", "student.name=resnet8",
                      f"teacher.name={teacher}", "train.precision=bf16", "data.train_samples=64",
                      "data.batch_size=16", "train.epochs=1", *extra, name=method)
    with pytest.warns(UserWarning):
        summary = Trainer(cfg).train()
    assert summary["completed"], summary
    assert all(value == value for value in summary["metrics"].values())  # validation ran, no NaN
    assert "val/student_top1" in summary["metrics"]


def test_auto_precision_uses_bf16_only_where_the_gpu_has_it():
    from kdscale.runtime.device import auto_uses_bf16

    assert auto_uses_bf16("auto", on_gpu=True, native_bf16=True)
    assert not auto_uses_bf16("auto", on_gpu=True, native_bf16=False)  # V100, T4: fp32, said in one line
    assert not auto_uses_bf16("auto", on_gpu=False, native_bf16=False)
    assert auto_uses_bf16("bf16", on_gpu=True, native_bf16=False)  # asked for: honoured
    assert not auto_uses_bf16("tf32", on_gpu=True, native_bf16=True)
