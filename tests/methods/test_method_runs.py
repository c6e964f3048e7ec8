"""Every method trains for real through the ``kdscale.train`` entry point: it completes,
logs its loss terms under stable names, evaluates every trainable network, and leaves
frozen teachers bit-identical. Plus ProKT's step order and bad-input errors."""

from __future__ import annotations

import glob
import json
import math
import os

import pytest
import torch
import yaml
from helpers.common import ROOT, base_overrides, make_config

from kdscale.config import load_config
from kdscale.errors import KdscaleError
from kdscale.models import build_model
from kdscale.runtime.device import Runtime
from kdscale.train.__main__ import main as train_main
from kdscale.train.loop import Trainer
from kdscale.train.setup import build_distiller

EXPECTED = {
    "vanilla": ({"ce"}, {"student"}),
    "kd": ({"ce", "kd"}, {"student", "teacher"}),
    "at": ({"ce", "at"}, {"student", "teacher"}),
    "dml": ({"ce", "kl", "peer1_ce", "peer1_kl"}, {"student", "peer1"}),
    "ctkd": ({"scratch_ce", "ce", "hint", "at_scratch"}, {"student", "scratch_teacher", "teacher"}),
    "prokt": ({"teacher_ce", "teacher_kl", "kd", "ce"}, {"student", "teacher"}),
    "ffcl": ({"ce", "teacher_ce", "fused_ce", "mutual_to_student", "mutual_to_teacher", "fused_to_student",
              "fused_to_teacher", "ensemble_to_fused", "at_to_student", "at_to_teacher", "pk_student",
              "pk_teacher"}, {"student", "teacher", "fused"}),
    "sokd": ({"kbm_ce", "kbm_kd_teacher", "kbm_kd_student", "ce", "kd"}, {"student", "kbm", "teacher"}),
    "dkd": ({"ce", "tckd", "nckd"}, {"student", "teacher"}),
    "dist": ({"ce", "inter", "intra"}, {"student", "teacher"}),
    "fitnet": ({"ce", "hint"}, {"student", "teacher"}),
    "rkd": ({"ce", "distance", "angle"}, {"student", "teacher"}),
    "pkt": ({"ce", "pkt"}, {"student", "teacher"}),
    "sp": ({"ce", "sp"}, {"student", "teacher"}),
    "reviewkd": ({"ce", "review"}, {"student", "teacher"}),
    "crd": ({"ce", "crd"}, {"student", "teacher"}),
    "deit": ({"ce", "dist"}, {"student", "class_head", "dist_head", "teacher"}),
    # A features-only teacher (no logits among its targets) has no top-1 of its own; the k-NN
    # top-1 of the summaries (train.knn_eval=auto: on for a method that distils features) is
    # logged as val/<name>_knn_top1.
    "features": ({"summary_teacher", "spatial_teacher"}, {"student", "student_knn", "teacher_knn"}),
}
TEACHERS = {"kd": "resnet20", "at": "resnet20", "ctkd": "resnet20", "prokt": "resnet20", "ffcl": "resnet20",
            "sokd": "wrn_16_2", "dkd": "resnet20", "dist": "resnet20"}
TEACHERS.update({"fitnet": "resnet20", "rkd": "resnet20", "pkt": "resnet20", "sp": "wrn_16_2"})
TEACHERS.update({"reviewkd": "resnet20", "crd": "resnet20", "deit": "resnet20", "features": "resnet20"})
TARGETS = {"features": "[summary,spatial]"}
"""A teacher's ``targets`` for methods that distil features (the default, its logits, for the others)."""
STUDENTS = {"deit": "timm:deit_tiny_distilled_patch16_224"}
"""Methods that need a student of their own kind; timm students are shrunk by :func:`small_timm`."""


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    paths = {}
    for name in set(TEACHERS.values()):
        torch.manual_seed(7)
        paths[name] = str(folder / f"{name}.pt")
        torch.save(build_model(name, 10).state_dict(), paths[name])
    return paths


def method_overrides(method: str, teacher_files) -> list[str]:
    extra = [f"method.name={method}", f"student.name={STUDENTS.get(method, 'resnet8')}", "data.train_samples=320",
             "train.epochs=1"]
    if method in TEACHERS:
        extra += [f"teacher.name={TEACHERS[method]}", f"teacher.weights={teacher_files[TEACHERS[method]]}"]
    if method in TARGETS:
        extra += [f"teacher.targets={TARGETS[method]}"]
    if method == "crd":  # 16384 negatives of 1600 samples would only repeat rows; 256 keep the run quick
        extra += ["method.nce_k=256"]
    return extra


def small_timm(monkeypatch) -> None:
    """timm's distilled ViTs built at 32 px with one small block (the stock ones are 224 px)."""
    import timm
    from helpers.methods import TINY_DEIT

    create = timm.create_model

    def create_small(name, *args, **kwargs):
        return create(name, *args, **({**kwargs, **TINY_DEIT} if "distilled" in name else kwargs))

    monkeypatch.setattr(timm, "create_model", create_small)


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_method_trains_through_entry_point(method, synth_data, tmp_path, teacher_files, monkeypatch):
    if method in STUDENTS:
        small_timm(monkeypatch)
    summary = train_main(base_overrides(synth_data, str(tmp_path), name=method)
                         + method_overrides(method, teacher_files) + ["train.log_every_steps=1"])
    assert summary["completed"] and summary["step"] == 10
    terms, networks = EXPECTED[method]
    logged = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    train_keys = set().union(*(entry.keys() for entry in logged if "train/loss" in entry))
    assert {k[len("train/loss_"):] for k in train_keys if k.startswith("train/loss_")} == terms
    val_keys = set().union(*(entry.keys() for entry in logged if "val/samples" in entry))
    assert {k[len("val/"):-len("_top1")] for k in val_keys if k.endswith("_top1")} - {"agreement"} == networks
    # Every optimizer step has its own line with every term, and nothing logged is NaN or infinite.
    train = [entry for entry in logged if "train/loss" in entry]
    assert [entry["step"] for entry in train] == list(range(1, 11))
    term_keys = {f"train/loss_{term}" for term in terms}
    assert all({k for k in entry if k.startswith("train/loss_")} == term_keys for entry in train)
    assert_all_finite(logged)


def assert_all_finite(logged: list[dict]) -> None:
    """Every number in every logged line (json writes NaN and Infinity, and reads them back)."""
    bad = [(entry.get("step"), key, value) for entry in logged for key, value in entry.items()
           if isinstance(value, (int, float)) and not math.isfinite(value)]
    assert not bad, f"non-finite logged metrics (step, name, value): {bad}"


@pytest.mark.parametrize("method", ["at", "ctkd", "sokd"])
def test_frozen_teacher_unchanged_after_training(method, synth_data, tmp_path, teacher_files):
    cfg = load_config(None, base_overrides(synth_data, str(tmp_path), name=method)
                      + method_overrides(method, teacher_files) + ["data.train_samples=192"])
    trainer = Trainer(cfg)
    trainer.train()
    reference = torch.load(teacher_files[TEACHERS[method]], weights_only=True)
    after = trainer.teacher.frozen.model.state_dict()
    assert all(torch.equal(after[k], reference[k]) for k in reference)


def test_prokt_updates_teacher_before_the_student_reads_it(synth_data, tmp_path, teacher_files):
    cfg = load_config(None, base_overrides(synth_data, str(tmp_path), name="order")
                      + method_overrides("prokt", teacher_files) + ["train.stop_after_steps=2"])
    trainer = Trainer(cfg)
    calls = []
    teacher = trainer.distiller.teacher

    def record(module, _inputs, _output):
        if not trainer.distiller.training:  # the teacher's validation at step 0
            return
        calls.append((module.training, torch.cat([p.detach().flatten() for p in module.parameters()]).clone()))

    teacher.register_forward_hook(record)
    trainer.train()
    # Per iteration: teacher phase (train mode), then the student phase reads the teacher in
    # eval mode with the weights the teacher step just produced.
    assert [mode for mode, _ in calls[:4]] == [True, False, True, False]
    assert not torch.equal(calls[0][1], calls[1][1])  # stepped between its two forwards
    assert torch.equal(calls[1][1], calls[2][1])  # the student step leaves the teacher alone


def _shipped_configs():
    """Every shipped config; one with a ZeRO-3 teacher (a ViT-L: half a minute to build on CPU)
    in the full tier only."""
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))):
        raw = yaml.safe_load(open(path))
        large = any(t.get("sharding") == "zero3" for t in raw.get("teachers", []))
        yield pytest.param(path, id=os.path.basename(path), marks=[pytest.mark.slow] if large else [])


@pytest.mark.parametrize("path", list(_shipped_configs()))
def test_every_shipped_config_builds_its_method(path):
    raw = yaml.safe_load(open(path))
    overrides = ["teacher.weights=null"] if "teacher" in raw else \
        [f"teachers.{i}.weights=null" for i in range(len(raw.get("teachers", [])))]
    # One process: a ZeRO-3 teacher (features_imagenet.yaml's ViT-L) is built replicated here.
    overrides += [f"teachers.{i}.sharding=replicated" for i, t in enumerate(raw.get("teachers", []))
                  if t.get("sharding") == "zero3"]
    cfg = load_config(path, overrides)
    labels = torch.arange(64) % cfg.data.num_classes  # CRD's bank rows (the shards are not there)
    distiller, _ = build_distiller(cfg, Runtime(torch.device("cpu"), None, False), train_labels=labels)
    assert distiller.name == cfg.method.name, path


@pytest.mark.parametrize("extra, message", [
    (["method.name=sokd"], "method 'sokd' needs a frozen teacher: set teacher.name"),
    (["method.name=ffcl"], "method 'ffcl' needs a teacher network to train with the student: set teacher.name"),
    (["method.name=at", "teacher.name=resnet20", "method.teacher_layers=[layer1,layer9,layer3]"],
     "method.teacher_layers (teacher): CifarResNet has no layer 'layer9'; valid top-level layers: conv1, bn1, relu, "
     "layer1, layer2, layer3, avgpool, fc"),
    (["method.name=ctkd", "teacher.name=resnet20", "method.scratch_layers=[layer2,layer3]"],
     "which differ in number; set method.scratch_layers and method.teacher_layers"),
    (["method.name=ctkd", "teacher.name=resnet20", "student.name=wrn_16_2"],
     "method.share_stem: the student's stem (conv1.weight (16, 3, 3, 3)) and the scratch teacher's stem "
     "(conv1.weight (16, 3, 3, 3), bn1.weight (16,), bn1.bias (16,)) differ"),
    (["method.name=sokd", "teacher.name=resnet20", "method.bridge_input=layer1", "method.bridge_layers=[layer3]"],
     "method.bridge_layers ['layer3'] do not accept the output of method.bridge_input 'layer1' (shape (16, 32, 32))"),
    (["method.name=prokt", "teacher.name=resnet20", "train.grad_accum_steps=2"],
     "method 'prokt' takes one optimizer step per phase (teacher, student); set train.grad_accum_steps=1"),
])
def test_bad_method_input_fails_before_training(extra, message, synth_data, tmp_path):
    cfg = make_config(synth_data, str(tmp_path), "student.name=resnet8", *extra)
    with pytest.raises(KdscaleError) as err:
        Trainer(cfg)
    assert message in str(err.value)


def test_methods_command_lists_every_method(capsys):
    from kdscale.cli import main

    main(["methods"])
    out = capsys.readouterr().out
    for name in EXPECTED:
        assert f"\n{name:10s} " in "\n" + out
    assert "trains: student, kbm; frozen-teacher outputs: logits, features" in out
    assert "trains: student, teacher; frozen-teacher outputs: none" in out  # prokt
