"""Label-free feature distillation end to end (issue 27): a teacher trained here teaches only its
features (its classifier unused) to a ResNet student over shards without ``.cls``; validation
logs k-NN top-1 (checked against a k-NN computed here with numpy) that rises well above the
student's initialisation towards the teacher's own; label-needing terms refuse such data;
resume is exact; feature teachers of different grids and widths are sized by a dry forward.

The terms' golden values are in tests/methods/test_features_method.py; 2 ranks = 1 rank in
tests/scaleout/test_features_ranks.py; replayed feature shards in tests/runs/test_feature_shards.py."""

from __future__ import annotations

import glob
import json
import os
import tarfile
import warnings

import numpy as np
import pytest
import torch
from helpers.common import base_overrides

from kdscale.config import load_config
from kdscale.data.loader import ValStream
from kdscale.errors import KdscaleError
from kdscale.models import build_model
from kdscale.models.feature_targets import FeatureTargets
from kdscale.models.weights import load_weights
from kdscale.runtime.device import Runtime
from kdscale.train.__main__ import main as train_main
from kdscale.train.setup import build_distiller, plan_data

DIFFICULTY = 0.5
FEATURES = ["method.name=features", "teacher.targets=[summary, spatial]"]


def unlabelled_copy(src: str, dst: str) -> None:
    """The training shards of ``src`` without their ``.cls`` members, and an index.json that
    records the split as unlabelled (what ``from-folder --unlabelled`` writes)."""
    os.makedirs(dst)
    for path in sorted(glob.glob(os.path.join(src, "train-*.tar"))):
        with tarfile.open(path) as source, tarfile.open(os.path.join(dst, os.path.basename(path)), "w") as out:
            for member in source.getmembers():
                if not member.name.endswith(".cls"):
                    out.addfile(member, source.extractfile(member))
    index = json.load(open(os.path.join(src, "index.json")))
    index["splits"] = {"train": {**index["splits"]["train"], "labelled": False}}
    json.dump(index, open(os.path.join(dst, "index.json"), "w"))


@pytest.fixture(scope="module")
def feature_data(tmp_path_factory):
    """(labelled set, its unlabelled copy): 10 classes, 1600 train and 400 val 32-px images."""
    from kdscale.data.synth import write_synthetic_shards

    root = tmp_path_factory.mktemp("features")
    labelled, unlabelled = str(root / "labelled"), str(root / "unlabelled")
    write_synthetic_shards(labelled, num_classes=10, train_samples=1600, val_samples=400, image_size=32,
                           samples_per_shard=200, difficulty=DIFFICULTY, seed=1, progress=False)
    unlabelled_copy(labelled, unlabelled)
    return labelled, unlabelled


def label_free(labelled: str, unlabelled: str, out: str, name: str, *extra: str) -> list[str]:
    return base_overrides(labelled, out, name) + FEATURES + [
        f"data.train_shards={unlabelled}/train-*.tar", "data.labels=none",
        f"data.knn_memory_shards={labelled}/train-*.tar", *extra]


def summaries(model, shards: str, data) -> tuple[np.ndarray, np.ndarray]:
    """The model's summary features (classifier input) of every image, centre-cropped, float64."""
    targets = FeatureTargets(model.eval(), ["summary"], where="model")
    features, labels = [], []
    with torch.no_grad():
        for batch in ValStream(sorted(glob.glob(shards)), data, rank=0, world_size=1):
            features.append(targets(batch.images)[1]["summary"].double())
            labels.append(batch.targets)
    targets.remove()
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


def knn_by_hand(model, labelled: str, data, k: int = 20, temperature: float = 0.07) -> float:
    """DINO's weighted k-NN top-1 in numpy: cosine similarity to the labelled training images,
    the k nearest vote ``exp(s / T)`` for their class."""
    memory, memory_labels = summaries(model, f"{labelled}/train-*.tar", data)
    queries, query_labels = summaries(model, f"{labelled}/val-*.tar", data)
    memory /= np.linalg.norm(memory, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    sims = queries @ memory.T
    right = 0
    for row, label in zip(sims, query_labels):
        votes = np.zeros(data.num_classes)
        for j in np.argsort(-row, kind="stable")[:k]:
            votes[memory_labels[j]] += np.exp(row[j] / temperature)
        right += int(votes.argmax() == label)
    return 100.0 * right / len(query_labels)


@pytest.fixture(scope="module")
def taught(feature_data, tmp_path_factory):
    """A ResNet-20 teacher trained with labels here, then a label-free ``features`` run from it
    into a ResNet-8 student: (teacher export, the run's summary)."""
    labelled, unlabelled = feature_data
    out = str(tmp_path_factory.mktemp("runs"))
    teacher = train_main(base_overrides(labelled, out, "teacher") + ["method.name=vanilla", "student.name=resnet20",
                                                                      "train.epochs=6", "train.eval_every_epochs=6"])
    assert teacher["completed"]
    # PHI-S: the CNN teacher's pooled ReLU features share one large mean direction, which raw
    # cosine targets spend the run on (measured: +6 k-NN points raw against +22 standardized).
    run = train_main(label_free(labelled, unlabelled, out, "student", "student.name=resnet8", "teacher.name=resnet20",
                                f"teacher.weights={teacher['export']}", "train.epochs=10", "train.eval_every_epochs=10",
                                "optim.lr=0.2", "method.standardize=phi-s", "method.standardize_batches=20"))
    return teacher["export"], run


@pytest.mark.slow
def test_label_free_run_lifts_the_students_knn_towards_the_teachers(taught, feature_data):
    teacher_export, run = taught
    labelled, _ = feature_data
    metrics = run["metrics"]
    assert run["completed"] and metrics["val/samples"] == 400
    data = load_config(None, base_overrides(labelled, "unused")).data
    # The logged k-NN is the protocol computed by hand, for the student and the teacher.
    student = build_model("resnet8", 10)
    load_weights(student, run["export"], where="test")
    teacher = build_model("resnet20", 10, teacher_export, where="teacher")
    assert metrics["val/student_knn_top1"] == pytest.approx(knn_by_hand(student, labelled, data), abs=0.26)
    assert metrics["val/teacher_knn_top1"] == pytest.approx(knn_by_hand(teacher, labelled, data), abs=0.26)
    # A real training signal: well above the student's initialisation (the run's seed), close to the teacher.
    torch.manual_seed(0)
    initial = knn_by_hand(build_model("resnet8", 10), labelled, data)
    print(f"k-NN top-1: initial {initial:.2f}, distilled {metrics['val/student_knn_top1']:.2f}, "
          f"teacher {metrics['val/teacher_knn_top1']:.2f}")
    # measured on 2 CPU cores: initial 42.5, distilled 64.75, teacher 69.0
    assert metrics["val/student_knn_top1"] >= initial + 12
    assert metrics["val/student_knn_top1"] >= metrics["val/teacher_knn_top1"] - 8
    assert metrics["val/cosine_teacher"] > 0.8 and metrics["val/cosine_teacher_spatial"] > 0.6  # standardized
    # Only features were taught: the student's classifier never trained (about chance).
    assert metrics["val/student_top1"] < 25
    assert "val/teacher_top1" not in metrics  # the teacher's head was not run


def test_label_needing_terms_refuse_unlabelled_data(feature_data, tmp_path):
    labelled, unlabelled = feature_data
    teacher = str(tmp_path / "t.pt")
    torch.save(build_model("resnet8", 10).state_dict(), teacher)
    common = ["student.name=resnet8", "teacher.name=resnet8", f"teacher.weights={teacher}", "train.epochs=1"]
    for extra, needs in ((["method.ce_weight=0.5"], "method 'features' needs labels for a term its settings turn on "
                                                    "(set that term's weight, e.g. method.ce_weight, to 0)"),
                         (["method.name=kd", "teacher.targets=null"], "method 'kd' needs labels; use a method")):
        with pytest.raises(KdscaleError) as info:
            plan_data(load_config(None, label_free(labelled, unlabelled, str(tmp_path), "refused", *common, *extra)), 1)
        assert needs in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(KdscaleError, match=r"are unlabelled .* data.labels=required"):
        plan_data(load_config(None, label_free(labelled, unlabelled, str(tmp_path), "refused", *common,
                                               "data.labels=required")), 1)


def test_resume_is_exact(feature_data, tmp_path):
    labelled, unlabelled = feature_data
    teacher = str(tmp_path / "t.pt")
    torch.manual_seed(3)
    torch.save(build_model("resnet8", 10).state_dict(), teacher)
    common = ["student.name=resnet8", "teacher.name=resnet8", f"teacher.weights={teacher}", "train.epochs=1",
              "data.train_samples=320", "train.knn_eval=never"]
    straight = train_main(label_free(labelled, unlabelled, str(tmp_path), "straight", *common))
    stopped = train_main(label_free(labelled, unlabelled, str(tmp_path), "stopped", *common, "train.stop_after_steps=4"))
    assert stopped["step"] == 4 and not stopped["completed"]
    resumed = train_main(label_free(labelled, unlabelled, str(tmp_path), "stopped", *common))
    assert resumed["completed"] and resumed["step"] == straight["step"] == 10
    a = torch.load(straight["checkpoint"], weights_only=True)["model"]
    b = torch.load(resumed["checkpoint"], weights_only=True)["model"]
    assert any(k.startswith("adaptors.teacher_spatial") for k in a)  # the heads are saved and resumed
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The adaptor heads exported beside the student (kdscale checkpoint consolidate RUN --network adaptors)
    from safetensors.torch import load_file

    from kdscale.checkpoints import consolidate_student

    heads = load_file(consolidate_student(resumed["run_dir"], "adaptors"))
    assert heads.keys() == {k.removeprefix("adaptors.") for k in b if k.startswith("adaptors.")}
    assert all(torch.equal(v, b[f"adaptors.{k}"]) for k, v in heads.items())
    with pytest.raises(KdscaleError, match=r"holds no bridge network \(it holds: adaptors, .*student\)"):
        consolidate_student(resumed["run_dir"], "bridge")


def test_knn_needs_a_labelled_memory(feature_data, tmp_path):
    from kdscale.train.knn_eval import knn_memory_shards
    from kdscale.methods import get_method_class

    labelled, unlabelled = feature_data
    cfg = load_config(None, label_free(labelled, unlabelled, str(tmp_path), "x") + ["data.knn_memory_shards=null"])
    with pytest.warns(UserWarning, match="k-NN validation is off: the training shards are unlabelled; set "
                                         "data.knn_memory_shards"):
        assert knn_memory_shards(cfg, get_method_class("features")) is None
    cfg = load_config(None, base_overrides(labelled, str(tmp_path)) + ["method.name=kd"])
    assert knn_memory_shards(cfg, get_method_class("kd")) is None  # auto: only methods that distil features
    cfg = load_config(None, base_overrides(labelled, str(tmp_path)) + ["method.name=kd", "train.knn_eval=always"])
    assert knn_memory_shards(cfg, get_method_class("kd")) == sorted(glob.glob(f"{labelled}/train-*.tar"))


# -- teachers of different grids and widths ----------------------------------------------
THREE = ("teachers=[{id: vit_a, name: 'timm:test_vit', timm_options: {img_size: 32, patch_size: 8}, "
         "targets: [summary, spatial]}, {id: vit_b, name: 'timm:test_vit2', input_size: 48, targets: [spatial], "
         "timm_options: {img_size: 48, patch_size: 4, embed_dim: 32}}, {id: cnn, name: resnet20, "
         "targets: [summary, spatial]}]")


def build(*overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random teachers
        return build_distiller(load_config(None, ["method.name=features", "student.name=resnet8",
                                                  "data.num_classes=10", *overrides]),
                               Runtime(torch.device("cpu"), None, False))


def test_teachers_of_different_grids_and_widths_are_sized_by_a_dry_forward():
    distiller, frozen = build(THREE)
    heads = {name: adaptor for name, adaptor in distiller.adaptors.items()}
    assert sorted(heads) == ["cnn_spatial", "cnn_summary", "vit_a_spatial", "vit_a_summary", "vit_b_spatial"]
    sizes = {"vit_a": 32, "vit_b": 48, "cnn": 32}  # each at its own input size (the run's view resizes to it)
    out = {tid: teacher(torch.randn(2, 3, sizes[tid], sizes[tid])).member_features[""]
           for tid, teacher in frozen.items()}
    # test_vit: 64 wide, grid 32/8 = 4; test_vit2 built 32 wide, grid 48/4 = 12; resnet20: 64 at 8x8
    assert out["vit_a"]["spatial"].shape[-2:] == (4, 4) and out["vit_b"]["spatial"].shape[-2:] == (12, 12)
    assert out["cnn"]["spatial"].shape[1:] == (64, 8, 8) and out["cnn"]["summary"].shape[1:] == (64,)
    assert "summary" not in out["vit_b"]
    for tid, kinds in out.items():
        for kind, target in kinds.items():
            head = heads[f"{tid}_{kind}"]
            student = torch.randn(2, 64) if kind == "summary" else torch.randn(2, 64, 8, 8)
            assert head(student).shape == target.shape  # the head maps the student onto the teacher's target
    assert out["vit_a"]["spatial"].shape[1] != out["vit_b"]["spatial"].shape[1]  # widths differ too


@pytest.mark.parametrize("overrides, message", [
    (["teachers=[{name: 'torchvision:mobilenet_v2', id: mnv2, targets: [spatial]}]"],
     r"^teacher: MobileNetV2 has no module named avgpool to take its spatial features from; set "
     r"teacher.spatial_layer"),
    (["teacher.name=resnet20"], r"method 'features' distils teachers' features, but no online teacher gives any: "
                                r"set targets: \[summary, spatial\] on a teacher entry"),
    (["teachers=[{name: resnet20, targets: [summary]}, {name: resnet8}]"],
     r"method 'features' reads only teachers' summary or spatial features; teachers\[1\] \(teacher1\) would run for "
     r"nothing: set teachers\[1\].targets"),
    (["teacher.name=resnet20", "teacher.targets=[summary]", "method.name=kd"],
     r"teacher.targets=\['summary'\]: method 'kd' reads no summary or spatial features"),
    (["teacher.name=resnet20", "teacher.timm_options={img_size: 48}"],
     r"teacher.timm_options applies to timm: models only"),
])
def test_feature_teacher_errors_name_the_teacher(overrides, message):
    with pytest.raises(KdscaleError, match=message) as info:
        build(*overrides)
    assert "\n" not in str(info.value)
