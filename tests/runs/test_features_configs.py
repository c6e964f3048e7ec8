"""The shipped feature-distillation configs (method ``features``, AM-RADIO): the CIFAR-size one
trains on CPU as shipped (its random-weight teachers, no labels) for two steps on the synthetic
shards, and the ImageNet one names the hub weights and settings its header states."""

from __future__ import annotations

import json
import math
import os

from helpers.common import ROOT, base_overrides

from kdscale.config import load_config

CIFAR = f"{ROOT}/configs/features_cifar100.yaml"
IMAGENET = f"{ROOT}/configs/features_imagenet.yaml"


def test_cifar_config_trains_two_steps_without_labels(synth_data, tmp_path):
    from kdscale.train.__main__ import main as train_main

    overrides = base_overrides(synth_data, str(tmp_path), name="features") + [
        "data.batch_size=8", "data.train_samples=16", f"data.val_shards={synth_data}/val-000000.tar",
        f"data.knn_memory_shards={synth_data}/train-*.tar", "data.knn_memory_samples=32", "train.epochs=1",
        "train.log_every_steps=1"]
    summary = train_main(["--config", CIFAR, *overrides])
    assert summary["completed"] and summary["step"] == 2, summary
    logged = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    train = [entry for entry in logged if "train/loss" in entry]
    assert [entry["step"] for entry in train] == [1, 2]
    terms = {f"train/loss_{kind}_{tid}" for tid in ("r32x4", "vit") for kind in ("summary", "spatial")}
    assert all({k for k in entry if k.startswith("train/loss_")} == terms for entry in train), train
    val = {k for entry in logged if "val/samples" in entry for k in entry}
    assert {"val/student_knn_top1", "val/r32x4_knn_top1", "val/vit_knn_top1", "val/cosine_r32x4",
            "val/cosine_vit"} <= val, val
    assert all(math.isfinite(v) for entry in logged for v in entry.values() if isinstance(v, (int, float)))


def test_imagenet_config_states_its_teachers():
    cfg = load_config(IMAGENET)
    dinov2, clip = cfg.teachers
    assert (dinov2.name, dinov2.weights, dinov2.sharding) == ("timm:vit_large_patch14_dinov2.lvd142m", "timm:DEFAULT",
                                                             "zero3")
    assert dinov2.timm_options == {"img_size": 224} and dinov2.input_size == cfg.data.image_size == 224
    assert (clip.name, clip.weights, clip.input_size) == ("timm:vit_base_patch16_clip_224.openai", "timm:DEFAULT", 224)
    assert all(t.targets == ["summary", "spatial"] for t in cfg.teachers)
    assert cfg.data.labels == "none" and cfg.method.name == "features" and cfg.student.name == "timm:resnet50"
    assert cfg.method.params.ce_weight == cfg.method.params.kd_weight == 0


def test_imagenet_teachers_means_are_their_pretrained_ones():
    """The means and stds written out in the config are the ones timm's pretrained_cfg gives."""
    from kdscale.models.preprocessing import pretrained_preprocessing

    for teacher in load_config(IMAGENET).teachers:
        pre = pretrained_preprocessing(teacher.name, teacher.weights)
        assert list(pre.mean) == teacher.mean and list(pre.std) == teacher.std, teacher.id
