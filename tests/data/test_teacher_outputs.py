"""Teacher-output shards: written by 2 real ranks with loader workers, aligned by key, equal
to the online teacher on the stored crops and to the per-image writer, resumable, and usable
for training without a teacher."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
from helpers.common import ROOT, base_overrides, make_config, run_cli
from PIL import Image

from kdscale.data.loader import _samples_of
from kdscale.data.shards import expand_shards
from kdscale.data.teacher_outputs import META_FILE, decode_record, replay_crop
from kdscale.errors import KdscaleError
from kdscale.models import build_model
from kdscale.teach.__main__ import main as teach_main
from kdscale.train.loop import Trainer

pytestmark = pytest.mark.slow  # real multi-process runs: the full tier only

R, K = 3, 5


@pytest.fixture(scope="module")
def teacher_export(synth_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("teacher"))
    return Trainer(make_config(synth_data, out, "student.name=resnet8", "train.epochs=2", name="t")).train()["export"]


def teach_overrides(synth_data, outputs, export):
    return base_overrides(synth_data, os.path.dirname(outputs), name="teach") + [
        "method.name=kd", "student.name=resnet8", "teacher.name=resnet8", f"teacher.weights={export}",
        "data.augment=imagenet", f"teacher.outputs={outputs}", f"teacher.crops_per_image={R}", f"teacher.top_k={K}",
        "data.num_workers=2"]


@pytest.fixture(scope="module")
def outputs(synth_data, teacher_export, tmp_path_factory):
    outputs = str(tmp_path_factory.mktemp("tout") / "teacher-outputs")
    result = run_cli(["bash", os.path.join(ROOT, "launch", "accelerate.sh"), "-m", "kdscale.teach",
                      *teach_overrides(synth_data, outputs, teacher_export)], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1600 samples in 8 new shards (0 already done)" in result.stdout
    return outputs


def test_companions_align_with_image_shards(synth_data, outputs):
    meta = json.load(open(os.path.join(outputs, META_FILE)))
    assert meta["crops_per_image"] == R and meta["top_k"] == K and meta["num_classes"] == 10
    for shard in expand_shards(f"{synth_data}/train-*.tar", "k"):
        images = list(_samples_of([shard]))
        records = list(_samples_of([os.path.join(outputs, os.path.basename(shard))]))
        assert [s["__key__"] for s in images] == [r["__key__"] for r in records]
        arrays = decode_record(records[0])
        assert arrays["crops"].shape == (R, 4) and arrays["probs"].shape == (R, K)
        assert str(arrays["probs"].dtype) == "float16" and str(arrays["classes"].dtype) == "int32"


def test_stored_soft_labels_equal_the_online_teacher(synth_data, outputs, teacher_export):
    teacher = build_model("resnet8", 10, teacher_export).eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    shard = expand_shards(f"{synth_data}/train-*.tar", "k")[3]
    images = {s["__key__"]: s["jpg"] for s in _samples_of([shard])}
    records = list(_samples_of([os.path.join(outputs, os.path.basename(shard))]))[:12]
    for record in records:
        arrays = decode_record(record)
        image = Image.open(io.BytesIO(images[record["__key__"]])).convert("RGB")
        for r in range(R):
            view = (replay_crop(image, arrays["crops"][r], bool(arrays["flips"][r]), 32).float() / 255 - mean) / std
            with torch.no_grad():
                probs = torch.softmax(teacher(view[None]), dim=1)[0]
            stored = torch.from_numpy(arrays["probs"][r].astype("float32"))
            classes = torch.from_numpy(arrays["classes"][r].astype("int64"))
            assert torch.allclose(probs[classes], stored, atol=2e-3)  # fp16 storage
            assert torch.allclose(probs.topk(K).values, stored, atol=2e-3)  # they are the top-k


def test_two_ranks_with_workers_write_what_the_per_image_writer_wrote(synth_data, outputs, teacher_export):
    from test_teach_writer import assert_same_as_reference

    # Shards 0 and 1: one written by each rank.
    assert_same_as_reference(synth_data, outputs, teacher_export, seed=0, shards=slice(0, 2))


def test_teach_resumes(synth_data, outputs, teacher_export, capsys):
    target = os.path.join(outputs, "train-000005.tar")
    stamps = {n: os.path.getmtime(os.path.join(outputs, n)) for n in os.listdir(outputs) if n.endswith(".tar")}
    os.remove(target)
    summary = teach_main(teach_overrides(synth_data, outputs, teacher_export))
    assert summary["shards_written"] == 1 and summary["shards_reused"] == 7
    for name, stamp in stamps.items():
        if name != "train-000005.tar":
            assert os.path.getmtime(os.path.join(outputs, name)) == stamp


def test_training_from_teacher_shards_learns(synth_data, outputs, tmp_path):
    cfg = make_config(synth_data, str(tmp_path), "method.name=kd", "student.name=resnet8", "teacher.source=shards",
                      f"teacher.outputs={outputs}", "data.augment=imagenet", "train.epochs=3", name="shards")
    trainer = Trainer(cfg)
    assert trainer.teacher.frozen is None and trainer.teacher.outputs_dirs  # replayed: no teacher network at all
    summary = trainer.train()
    assert summary["completed"] and summary["metrics"]["val/student_top1"] > 25.0
    logged = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    kd = [e["train/loss_kd"] for e in logged if "train/loss_kd" in e]
    assert kd[-1] < kd[0]


def test_teacher_shard_errors(synth_data, outputs, tmp_path):
    base = ["student.name=resnet8", "teacher.source=shards", "data.augment=imagenet"]
    with pytest.raises(KdscaleError, match="method 'at' needs features: use teacher.source=online"):
        Trainer(make_config(synth_data, str(tmp_path), "method.name=at", f"teacher.outputs={outputs}", *base))
    with pytest.raises(KdscaleError, match="set data.augment=imagenet"):
        Trainer(make_config(synth_data, str(tmp_path), "method.name=kd", f"teacher.outputs={outputs}", *base,
                            "data.augment=cifar"))
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in os.listdir(outputs):
        if name != "train-000002.tar":
            os.link(os.path.join(outputs, name), partial / name)
    with pytest.raises(KdscaleError, match="teacher outputs missing for 1 of 8 image shards, e.g. train-000002.tar"):
        Trainer(make_config(synth_data, str(tmp_path), "method.name=kd", f"teacher.outputs={partial}", *base))
    import shutil
    shutil.copy(os.path.join(outputs, "train-000001.tar"), partial / "train-000002.tar")  # wrong keys
    cfg = make_config(synth_data, str(tmp_path), "method.name=kd", f"teacher.outputs={partial}", *base,
                      "data.train_shards=" + f"{synth_data}/train-000002.tar", "data.train_samples=64", name="x")
    with pytest.raises(KdscaleError, match="teacher outputs do not match image shard .*train-000002.tar: key"):
        Trainer(cfg).train()
