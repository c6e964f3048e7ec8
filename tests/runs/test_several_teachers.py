"""Several frozen teachers in one run (issue 26): the ``teachers`` list and its errors, each
teacher's own view of the student's crop, no gradient into any teacher, validation of each
teacher and the ensemble, and replayed teachers equal to the same teachers online.

The ensemble targets' golden values are in tests/methods/test_ensemble.py; 2 ranks = 1 rank
with two teachers (one ZeRO-3) in tests/scaleout/test_two_teachers_ranks.py."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torchvision.transforms.functional as TF
from helpers.common import make_config

from kdscale.config import config_from_dict, config_to_dict, load_config
from kdscale.data.teacher_outputs import check_same_crops
from kdscale.errors import KdscaleError
from kdscale.models import build_model
from kdscale.runtime.device import Runtime
from kdscale.train.setup import build_distiller

DATA_MEAN, DATA_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TWO = ["method.name=kd", "student.name=resnet8", "data.num_classes=10",
       "teachers=[{name: resnet20, id: cnn}, {name: resnet8, id: small, weight: 3}]"]


def build(*overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random teachers
        return build_distiller(load_config(None, list(overrides)), Runtime(torch.device("cpu"), None, False),
                               world_size=2)


# -- the list and its errors ------------------------------------------------------------
def test_teacher_is_a_list_of_one_and_ids_default():
    one = load_config(None, ["method.name=kd", "teacher.name=resnet20", "teacher.weights=t.pt"])
    assert one.teacher is None and [(t.id, t.name, t.weights) for t in one.teachers] == [("teacher", "resnet20", "t.pt")]
    saved = config_to_dict(one)
    assert "teacher" not in saved and config_from_dict(saved).teachers == one.teachers  # a checkpoint's config
    two = load_config(None, ["method.name=kd", "teachers=[{name: resnet20}, {name: resnet8}]", "teachers.1.weight=2"])
    assert [(t.id, t.weight) for t in two.teachers] == [("teacher0", 1.0), ("teacher1", 2.0)]


@pytest.mark.parametrize("overrides, message", [
    (["teacher.name=resnet8", "teachers=[{name: resnet20}]"], r"teacher: set either teacher .* or teachers"),
    (["teachers=[{name: resnet20, id: a}, {name: resnet8, id: a}]"], r"teachers\[1\]\.id: 'a' is also the id of "
                                                                      r"teachers\[0\]"),
    (["teachers=[{name: resnet20, id: 'x y'}]"], r"teachers\[0\]\.id: 'x y' is not a valid id"),
    (["teachers=[{name: resnet20, id: ensemble}]"], r"'ensemble' is a metric name already"),
    (["teachers=[{name: resnet20, weight: 0}]"], r"teachers\[0\]\.weight.*must be > 0"),
    (["teachers=[{name: resnet20, wieght: 2}]"], r"teachers\[0\]\.wieght: unknown key; did you mean "
                                                  r"'teachers\[0\]\.weight'"),
    (["teachers=[{name: resnet20}]", "method.feature_teacher=b"], r"method.feature_teacher: no teacher has id 'b'"),
    (["teachers=[{name: resnet20}]", "teachers.2.weight=1"], r"teachers is a list of 1; '2' is not an index"),
])
def test_teacher_list_errors_name_the_entry(overrides, message):
    with pytest.raises(KdscaleError, match=message):
        load_config(None, ["method.name=kd", *overrides])


def test_what_takes_one_teacher_refuses_several():
    from kdscale.teach.writer import check_teach_config

    cfg = load_config(None, TWO + ["data.augment=imagenet"])
    with pytest.raises(KdscaleError, match=r"kdscale.teach .* takes one teacher, but teachers lists 2 \(cnn, small\)"):
        check_teach_config(cfg)
    with pytest.raises(KdscaleError, match=r"method 'prokt' \(it trains its teacher\) takes one teacher"):
        build(*TWO, "method.name=prokt")


def test_feature_methods_take_one_teacher_by_id():
    _, frozen = build(*TWO, "method.name=at", "teachers=[{name: resnet20, id: cnn}]")
    assert set(frozen) == {"cnn"} and frozen["cnn"].taps is not None
    with pytest.raises(KdscaleError, match=r"method 'at' reads only the features of one teacher "
                                           r"\(method.feature_teacher=cnn\); teachers\[1\] \(small\) would run for "
                                           r"nothing"):
        build(*TWO, "method.name=at")
    # A method reading logits and features: every teacher runs, only the feature teacher is tapped.
    _, frozen = build(*TWO, "method.name=sokd", "method.feature_teacher=small")
    assert frozen["cnn"].taps is None and frozen["small"].taps is not None


def test_teacher_placement_is_per_teacher():
    with pytest.raises(KdscaleError, match=r"teachers\[1\]\.sharding=zero3 partitions the teacher across "
                                           r"processes, but this run has 1"):
        build_distiller(load_config(None, TWO + ["teachers.1.sharding=zero3"]),
                        Runtime(torch.device("cpu"), None, False), world_size=1)


def test_replayed_teachers_must_store_the_same_crops():
    meta = {"seed": 0, "crops_per_image": 4, "image_size": 32, "top_k": 5}
    check_same_crops({"a": meta, "b": {**meta, "top_k": 10}})  # top-k may differ
    with pytest.raises(KdscaleError, match=r"teacher outputs a and b store different crops \(seed 0 vs 1\)"):
        check_same_crops({"a": meta, "b": {**meta, "seed": 1}})


# -- a run with two teachers ------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    """A CIFAR ResNet-20 and a timm ViT (160 px, its own mean and std), random weights, in files."""
    folder = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(3)
    cnn, vit = str(folder / "resnet20.pt"), str(folder / "vit.pt")
    torch.save(build_model("resnet20", 10).state_dict(), cnn)
    torch.save(build_model("timm:test_vit3", 10).state_dict(), vit)
    return cnn, vit


@pytest.mark.slow
def test_each_teacher_sees_its_own_view_and_learns_nothing(synth_data, teacher_files, tmp_path):
    from kdscale.train.loop import Trainer

    cnn, vit = teacher_files
    cfg = make_config(synth_data, str(tmp_path), "method.name=kd", "student.name=resnet8", "data.train_samples=256",
                      f"teachers=[{{name: resnet20, id: cnn, weights: {cnn}}}, {{name: 'timm:test_vit3', id: vit, "
                      f"weights: {vit}, weight: 3, input_size: 160, mean: [0.5, 0.5, 0.5], std: [0.25, 0.5, 1.0]}}]")
    trainer = Trainer(cfg)
    seen = {"student": [], "cnn": [], "vit": []}
    networks = {"student": trainer.distiller.student, **{tid: f.model for tid, f in trainer.teacher.online.items()}}
    for name, net in networks.items():
        net.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0].detach().clone()))
    before = {tid: {k: v.clone() for k, v in f.model.state_dict().items()} for tid, f in trainer.teacher.online.items()}
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    assert summary["completed"] and len(seen["student"]) >= 8  # 8 steps, then validation
    for student_view, cnn_view, vit_view in zip(seen["student"][:8], seen["cnn"][:8], seen["vit"][:8]):
        assert torch.equal(cnn_view, student_view)  # the data's view: the batch itself
        pixels = student_view * torch.tensor(DATA_STD).view(1, 3, 1, 1) + torch.tensor(DATA_MEAN).view(1, 3, 1, 1)
        resized = TF.resize(pixels, [160, 160], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        expected = TF.normalize(resized, [0.5, 0.5, 0.5], [0.25, 0.5, 1.0])
        torch.testing.assert_close(vit_view, expected, atol=1e-5, rtol=0)
    optimized = {id(p) for group in trainer.engine.optimizers["all"].param_groups for p in group["params"]} \
        if hasattr(trainer.engine, "optimizers") else set()
    for tid, frozen in trainer.teacher.online.items():
        assert all(not p.requires_grad and p.grad is None and id(p) not in optimized for p in frozen.model.parameters())
        after = frozen.model.state_dict()
        assert all(torch.equal(before[tid][k], after[k]) for k in after), tid
    metrics = summary["metrics"]
    for key in ("val/cnn_top1", "val/vit_top1", "val/ensemble_top1", "val/agreement_top1", "val/agreement_cnn_top1",
                "val/agreement_vit_top1", "val/student_top1"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert trainer.teacher.members[1].weight == pytest.approx(0.75)


@pytest.mark.slow
def test_replaying_two_teachers_gives_the_online_losses(synth_data, tmp_path):
    """Both teachers' outputs written by kdscale.teach (top-k = all 10 classes, so nothing is
    truncated), replayed together: on every step's images (the one stored crop both replay),
    each member equals its teacher run online within fp16 storage, and so do the KD terms.
    Then one teacher online beside the other replayed: it runs on the replayed crop."""
    from kdscale.teach.__main__ import main as teach_main
    from kdscale.teachers.frozen import FrozenTeacher
    from kdscale.train.loop import Trainer
    from kdscale.train.teacher_source import TeacherSource

    files, outputs = {}, {}
    for seed, tid in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        files[tid] = str(tmp_path / f"{tid}.pt")
        torch.save(build_model("resnet8", 10).state_dict(), files[tid])
        outputs[tid] = str(tmp_path / f"outputs-{tid}")
        summary = teach_main(make_config_overrides(synth_data, tmp_path, f"teach-{tid}") + [
            "method.name=kd", "teacher.name=resnet8", f"teacher.weights={files[tid]}", f"teacher.outputs={outputs[tid]}",
            "teacher.crops_per_image=2", "teacher.top_k=10", "data.augment=imagenet"])
        assert summary["shards_written"] == 8
    cfg = make_config(synth_data, str(tmp_path), "method.name=kd", "student.name=resnet8", "data.augment=imagenet",
                      "data.train_samples=192", "train.epochs=1",
                      f"teachers=[{{id: a, source: shards, outputs: {outputs['a']}}}, "
                      f"{{id: b, source: shards, outputs: {outputs['b']}, weight: 2}}]", name="replay")
    trainer = Trainer(cfg)
    assert trainer.teacher.online == {} and trainer.teacher.outputs_dirs == [outputs["a"], outputs["b"]]
    online = {tid: FrozenTeacher(build_model("resnet8", 10, files[tid]), [], torch.device("cpu"), None, False)
              for tid in files}
    source, compared = trainer.teacher, []

    def replay_and_compare(images, probs):
        replayed = TeacherSource.__call__(source, images, probs)
        live = source.combine({tid: frozen(images) for tid, frozen in online.items()})
        for tid in ("a", "b"):
            torch.testing.assert_close(replayed.members[tid].exp(), torch.softmax(live.members[tid], 1), atol=2e-3,
                                       rtol=0)
        with torch.no_grad():
            _, terms_replayed = trainer.distiller.forward_train(images, torch.zeros(len(images), dtype=torch.long),
                                                                replayed)
            _, terms_live = trainer.distiller.forward_train(images, torch.zeros(len(images), dtype=torch.long), live)
        compared.append((terms_replayed["kd"].item(), terms_live["kd"].item()))
        return replayed

    source.__class__ = type("ComparingSource", (type(source),), {"__call__": lambda _s, i, p: replay_and_compare(i, p)})
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    assert summary["completed"] and len(compared) == 6
    for replayed_kd, live_kd in compared:
        assert replayed_kd == pytest.approx(live_kd, rel=2e-3, abs=1e-4)
    assert json.load(open(os.path.join(outputs["a"], "teacher_outputs.json")))["seed"] == 0
    # Mixed sources: teacher a online beside b replayed; a runs on the one crop b stored, which
    # is the student's own view of each step.
    mixed = make_config(synth_data, str(tmp_path), "method.name=kd", "student.name=resnet8", "data.augment=imagenet",
                        "data.train_samples=64", "train.epochs=1",
                        f"teachers=[{{id: a, name: resnet8, weights: {files['a']}}}, "
                        f"{{id: b, source: shards, outputs: {outputs['b']}}}]", name="mixed")
    trainer = Trainer(mixed)
    seen = {"student": [], "a": []}
    trainer.distiller.student.register_forward_pre_hook(lambda _m, args: seen["student"].append(args[0].clone()))
    trainer.teacher.online["a"].model.register_forward_pre_hook(lambda _m, args: seen["a"].append(args[0].clone()))
    try:
        assert trainer.train()["completed"]
    finally:
        trainer.close()
    assert trainer.teacher.outputs_dirs == [outputs["b"]] and len(seen["a"]) >= 2
    assert all(torch.equal(a, s) for a, s in zip(seen["a"][:2], seen["student"][:2]))


def make_config_overrides(synth_data, tmp_path, name):
    from helpers.common import base_overrides

    return base_overrides(synth_data, str(tmp_path), name=name) + ["student.name=resnet8"]


@pytest.mark.slow
def test_the_shipped_ensemble_config_runs(synth_data, tmp_path):
    """configs/kd_ensemble_cifar100.yaml as shipped, on the synthetic shards (10 classes, random
    teachers, 4 steps): it trains and scores both teachers, the ensemble and the agreements."""
    from helpers.common import ROOT, base_overrides

    from kdscale.train.loop import Trainer

    cfg = load_config(os.path.join(ROOT, "configs", "kd_ensemble_cifar100.yaml"), base_overrides(
        synth_data, str(tmp_path)) + ["teachers.0.weights=null", "teachers.1.weights=null", "data.train_samples=128",
                                      "train.epochs=1", "data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random teachers
        trainer = Trainer(cfg)
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    assert summary["completed"] and summary["step"] == 4
    assert {"val/r32x4_top1", "val/wrn40x2_top1", "val/ensemble_top1", "val/agreement_r32x4_top1",
            "val/agreement_wrn40x2_top1"} <= set(summary["metrics"])


def test_a_network_refusing_the_input_size_is_one_line():
    """A fixed-size ViT (timm's test_vit3 takes 160 px) asked for 32 px: one line naming the
    network and the key to set, not timm's assertion traceback."""
    with pytest.raises(KdscaleError, match=r"^student timm:test_vit3 does not accept 32x32 px inputs \(.*\); set "
                                           r"data.image_size to the size it was built for$"):
        build("method.name=kd", "student.name=timm:test_vit3", "teacher.name=resnet8", "data.image_size=32")
    with pytest.raises(KdscaleError, match=r"^teachers\[1\] timm:test_vit3 does not accept 32x32 px inputs .*; set "
                                           r"teachers\[1\].input_size to the size it was built for$"):
        build(*TWO, "teachers.1.name=timm:test_vit3", "data.image_size=32")
