"""What many tests share: the repository root, the Python running the tests, config overrides
for the synthetic shard set (``conftest.synth_data``), and running a command."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable


def base_overrides(data_dir: str, out_dir: str, name: str = "run") -> list[str]:
    return [
        f"experiment.name={name}", f"experiment.output_dir={out_dir}",
        f"data.train_shards={data_dir}/train-*.tar", f"data.val_shards={data_dir}/val-*.tar",
        "data.num_classes=10", "data.batch_size=32", "data.num_workers=0", "data.shuffle_buffer=256",
        "wandb.mode=disabled", "train.log_every_steps=5", "optim.schedule=cosine", "optim.lr=0.05",
    ]


def make_config(data_dir: str, out_dir: str, *extra: str, name: str = "run"):
    from kdscale.config import load_config

    return load_config(None, base_overrides(data_dir, out_dir, name) + list(extra))


def run_cli(args: list[str], env_extra: dict | None = None, timeout: int = 600, cwd: str = ROOT):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def short_distillation_run(data_dir: str, out_dir, method: str, *extra: str) -> dict:
    """One epoch of 192 samples of ``method`` in this process (``kdscale.train``'s ``main``):
    a ResNet-8 student from a random ResNet-20 teacher written to a file first (seed 7).
    Returns the run's summary."""
    import torch

    from kdscale.models import build_model
    from kdscale.train.__main__ import main as train_main

    teacher = os.path.join(str(out_dir), "teacher.pt")
    torch.manual_seed(7)
    torch.save(build_model("resnet20", 10).state_dict(), teacher)
    return train_main(base_overrides(data_dir, str(out_dir), name=method)
                      + [f"method.name={method}", "student.name=resnet8", "teacher.name=resnet20",
                         f"teacher.weights={teacher}", "data.train_samples=192", "train.epochs=1", *extra])
