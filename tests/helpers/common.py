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
