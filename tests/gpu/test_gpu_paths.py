"""GPU-path choices that CPUs can check: the process-to-GPU mapping and DeepSpeed settings
kdscale cannot honour, refused in one line before anything starts."""

from __future__ import annotations

import json

import pytest

from kdscale.config import load_config
from kdscale.engines.deepspeed_config import build_deepspeed_config
from kdscale.errors import KdscaleError


def test_more_processes_than_gpus_is_refused_in_one_line():
    from kdscale.errors import KdscaleError
    from kdscale.parallel.context import gpu_for

    assert gpu_for(3, 8, 8) == 3
    with pytest.raises(KdscaleError, match=r"8 processes on this node but 4 visible GPU\(s\) .*start one process "
                                           r"per GPU \(accelerate launch --num_processes 4 per node\)"):
        gpu_for(5, 8, 4)


def test_zero_offload_is_refused_in_one_line(tmp_path):
    path = tmp_path / "offload.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    cfg = load_config(None, ["data.batch_size=8", f"distributed.deepspeed_config={path}"])
    with pytest.raises(KdscaleError, match="offload_optimizer.device=cpu: ZeRO-Offload needs DeepSpeed's own CPU Adam"):
        build_deepspeed_config(cfg, stage=2, world_size=1)
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}}))
    assert build_deepspeed_config(cfg, stage=2, world_size=1)["zero_optimization"]["stage"] == 2


def test_deterministic_switch_sets_the_algorithms():
    import torch

    from kdscale.runtime.device import Runtime

    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        Runtime.from_config(load_config(None, ["train.deterministic=true"]), torch.device("cuda"))
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        Runtime.from_config(load_config(None, []), torch.device("cuda"))
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(saved[0])
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved[1:]
