"""Config: YAML + dotted overrides against the typed schema, with clear errors."""

from __future__ import annotations

import pytest

from kdscale.config import config_from_dict, config_to_dict, load_config
from kdscale.errors import KdscaleError


def write(tmp_path, text: str) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "method: {name: kd, temperature: 2}\nstudent: {name: resnet8}\noptim: {lr: 0.1}\n")
    cfg = load_config(path, ["optim.lr=0.2", "data.batch_size=256", "teacher.name=resnet20", "optim.milestones=[30,60]"])
    assert cfg.optim.lr == 0.2 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 256
    assert cfg.teachers[0].name == "resnet20" and cfg.teachers[0].source == "online"
    assert cfg.optim.milestones == [30.0, 60.0]
    assert cfg.method.name == "kd" and cfg.method.params.temperature == 2.0
    assert cfg.method.params.ce_weight == 0.1  # KD default kept
    assert len(cfg.teachers) == 1 and cfg.student.name == "resnet8"


def test_scientific_notation_string_is_a_float(tmp_path):
    cfg = load_config(write(tmp_path, "optim: {weight_decay: 1e-4}\n"))  # PyYAML reads 1e-4 as a string
    assert cfg.optim.weight_decay == pytest.approx(1e-4)


@pytest.mark.parametrize("override, fragment", [
    ("optim.lrr=0.1", "unknown key; did you mean 'optim.lr'?"),
    ("trian.epochs=3", "unknown key; did you mean 'train'?"),
    ("method.temprature=3", "did you mean 'method.temperature'?"),
    ("data.batch_size=abc", "expected int, got 'abc'"),
    ("data.batch_size=1.5", "expected int"),
    ("train.resume=7", "expected bool"),
    ("optim.name=adam", "'adam' is not one of 'sgd', 'adamw'"),
    ("optim.milestones=5", "expected a list"),
    ("method.name=kdd", "unknown method 'kdd'; did you mean 'kd'?"),
    ("optim=3", "expected a mapping"),
])
def test_bad_overrides_name_the_key(override, fragment):
    extra = ["method.name=kd"] if override.startswith("method.temp") else []
    with pytest.raises(KdscaleError) as err:
        load_config(None, extra + [override])
    assert fragment in str(err.value)
    assert "command-line override" in str(err.value)


def test_bad_key_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "train:\n  epocs: 3\n")
    with pytest.raises(KdscaleError, match=r"exp\.yaml: train\.epocs: unknown key; did you mean 'train\.epochs'"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(KdscaleError, match="config file not found: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(KdscaleError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(KdscaleError, match="must look like key.sub=value"):
        load_config(None, ["optim.lr"])


def test_round_trip_through_plain_data():
    cfg = load_config(None, ["method.name=kd", "method.kd_weight=0.5", "teacher.name=resnet20"])
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg


def test_every_shipped_config_is_valid():
    import glob
    import os

    from helpers.common import ROOT

    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    assert paths
    for path in paths:
        cfg = load_config(path)
        assert cfg.student.name, path
