"""Shared fixtures: a small synthetic shard set and photo-like samples. Helper functions live in
``tests/helpers/`` (imported from there, never from here)."""

from __future__ import annotations

import os

import pytest
import torch

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


@pytest.fixture(scope="session")
def probes(tmp_path_factory):
    """The engine probe's results, pooled over the suite: ``probes(ranks, *case)`` is one dict
    per rank (``helpers.scaleout.ProbePool``; cases declared by each test module)."""
    from helpers.scaleout import ProbePool

    return ProbePool(tmp_path_factory.mktemp("probes"))
