"""Shared fixtures: a small synthetic shard set and a config builder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """10 learnable classes of 32x32 JPEGs: 1600 train (8 shards), 400 val (4 shards)."""
    from kdscale.data.synth import write_synthetic_shards

    out = str(tmp_path_factory.mktemp("synth"))
    write_synthetic_shards(out, num_classes=10, train_samples=1600, val_samples=400, image_size=32,
                           samples_per_shard=200, difficulty=0.2, seed=1, progress=False)
    return out


@pytest.fixture(scope="session")
def photo_samples(tmp_path_factory):
    """48 ImageNet-size photo-like JPEG samples (``kdscale shards synth --photo-like``), decoded from one shard."""
    import glob

    from kdscale.data.loader import _samples_of
    from kdscale.data.synth import write_synthetic_shards

    out = tmp_path_factory.mktemp("photo")
    write_synthetic_shards(str(out), num_classes=4, train_samples=48, val_samples=4, samples_per_shard=48,
                           photo_like=True, progress=False)
    return list(_samples_of(sorted(glob.glob(str(out / "train-*.tar")))))


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
