"""A sweep config over the synthetic shard set, for the local and the Slurm sweep tests."""

from __future__ import annotations

import os

import yaml

from helpers.common import ROOT, base_overrides

PYTHON = os.path.join(ROOT, ".venv", "bin", "python")


def write_config(tmp_path, synth_data, name="grid") -> str:
    path = tmp_path / "sweep.yaml"
    sections: dict = {}
    for item in base_overrides(synth_data, str(tmp_path / "runs"), name) + [
            "student.name=resnet8", "data.train_samples=64", "train.epochs=1", "data.batch_size=16"]:
        key, value = item.split("=", 1)
        section, field = key.split(".", 1)
        sections.setdefault(section, {})[field] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(sections))
    return str(path)
