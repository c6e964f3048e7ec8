"""Teacher-output shards of feature targets (issue 28): ``kdscale.teach`` stores each crop's
summary feature and, when asked, its spatial map (float16), prints their size before any work,
teaches unlabelled shards; a replayed teacher gives the ``features`` method the loss terms the
same teacher gives online, within float16 rounding; the errors are one line each."""

from __future__ import annotations

import json
import logging
import os
import warnings

import numpy as np
import pytest
import torch
from helpers.common import base_overrides, make_config
from PIL import Image

from kdscale.data.shards import expand_shards
from kdscale.data.tar_reader import iter_samples
from kdscale.data.teacher_outputs import META_FILE, decode_record, record_bytes
from kdscale.errors import KdscaleError
from kdscale.models import build_model

R = 2
FEATURES = "targets: [summary, spatial]"
ONE_SHARD = "train-000000.tar"
"""One of the synthetic set's 8 training shards (200 images): a CPU teaches it in seconds."""


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(5)
    path = str(tmp_path_factory.mktemp("feature-teacher") / "resnet20.pt")
    torch.save(build_model("resnet20", 10).state_dict(), path)
    return path


class Lines(logging.Handler):
    """kdscale's log lines (its logger does not propagate to pytest's caplog)."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("kdscale").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("kdscale").removeHandler(self)


def teach(data, out, teacher, targets: str, *extra):
    from kdscale.teach.__main__ import main as teach_main

    outputs = os.path.join(out, "outputs")
    with Lines() as lines:
        summary = teach_main(base_overrides(data, out, name="teach") + [
            "method.name=features", "student.name=resnet8", "data.augment=imagenet",
            f"teacher={{name: resnet20, weights: {teacher}, outputs: {outputs}, crops_per_image: {R}, {targets}}}",
            *extra])
    return outputs, summary, lines.lines


@pytest.fixture(scope="module")
def feature_outputs(synth_data, teacher_file, tmp_path_factory):
    """The synthetic training set taught with summary and spatial targets (no logits)."""
    return teach(synth_data, str(tmp_path_factory.mktemp("feature-outputs")), teacher_file, FEATURES,
                 f"data.train_shards={synth_data}/{ONE_SHARD}")


def test_teach_stores_summary_and_spatial_float16_and_prints_their_size_first(synth_data, feature_outputs):
    outputs, summary, lines = feature_outputs
    meta = json.load(open(os.path.join(outputs, META_FILE)))
    assert meta["targets"] == ["summary", "spatial"] and meta["top_k"] == 0  # no logits asked: no probabilities
    assert meta["target_shapes"] == {"summary": [64], "spatial": [64, 8, 8]} and meta["feature_dtype"] == "float16"
    per_sample = record_bytes(R, 0, {"summary": (64,), "spatial": (64, 8, 8)})
    assert per_sample == 512 + -(-(16 + 4 + 12 + 20 + R * (17 + 2 * 64 + 2 * 64 * 64)) // 512) * 512
    assert summary["bytes_per_sample"] == per_sample and summary["dataset_bytes"] == 200 * per_sample
    size_line = next(i for i, line in enumerate(lines) if line.startswith(f"teacher outputs: {per_sample} bytes"))
    assert f"{R} crops x (summary 64 float16, spatial 64x8x8 float16) + crop boxes" in lines[size_line]
    assert "for the 200 training images" in lines[size_line]
    assert size_line < next(i for i, line in enumerate(lines) if "200 samples in 1 new shards" in line)
    shard = expand_shards(f"{synth_data}/train-*.tar", "k")[0]
    companion = os.path.join(outputs, os.path.basename(shard))
    records = list(iter_samples(companion))
    assert per_sample * len(records) <= os.path.getsize(companion) <= per_sample * len(records) + 10240  # tar's end
    arrays = decode_record(records[0])
    assert arrays["probs"].shape == (R, 0) and arrays["features"]["summary"].dtype == np.float16
    assert arrays["features"]["summary"].shape == (R, 64) and arrays["features"]["spatial"].shape == (R, 64, 8, 8)


def test_spatial_maps_only_when_asked_and_logits_beside_features(synth_data, teacher_file, tmp_path):
    outputs, summary, _ = teach(synth_data, str(tmp_path), teacher_file, "targets: [logits, summary], top_k: 3",
                                "data.train_shards=" + f"{synth_data}/train-000000.tar")
    meta = json.load(open(os.path.join(outputs, META_FILE)))
    assert meta["targets"] == ["logits", "summary"] and meta["target_shapes"] == {"summary": [64]}
    arrays = decode_record(next(iter_samples(os.path.join(outputs, "train-000000.tar"))))
    assert set(arrays["features"]) == {"summary"} and arrays["probs"].shape == (R, 3)
    assert summary["bytes_per_sample"] == record_bytes(R, 3, {"summary": (64,)}) == 1024


def feature_run(data, out, outputs, *extra, name="replay"):
    return make_config(data, out, "method.name=features", "student.name=resnet8", "data.augment=imagenet",
                       "data.train_samples=96", "train.epochs=1", f"data.train_shards={data}/{ONE_SHARD}",
                       f"teacher={{source: shards, outputs: {outputs}, {FEATURES}}}", *extra, name=name)


@pytest.mark.slow
def test_replayed_features_give_the_online_loss_terms(synth_data, feature_outputs, teacher_file, tmp_path):
    """Every step: the replayed teacher's stored features of the replayed crop equal the same
    teacher run online on the step's images within float16 rounding, and so do the loss terms."""
    from kdscale.models.feature_targets import FeatureTargets
    from kdscale.teachers.frozen import FrozenTeacher
    from kdscale.train.loop import Trainer
    from kdscale.train.teacher_source import TeacherSource

    outputs = feature_outputs[0]
    trainer = Trainer(feature_run(synth_data, str(tmp_path), outputs, "data.num_workers=1"))
    assert trainer.teacher.online == {} and trainer.teacher.outputs_dirs == [outputs]
    model = build_model("resnet20", 10, teacher_file)
    online = FrozenTeacher(model, [], torch.device("cpu"), None, False,
                           targets=FeatureTargets(model, ["summary", "spatial"], where="teacher"))
    source, compared = trainer.teacher, []

    def replay_and_compare(images, replayed):
        out = TeacherSource.__call__(source, images, replayed)
        live = source.combine({"teacher": online(images)})
        for kind in ("summary", "spatial"):
            stored, fresh = out.member_features["teacher"][kind], live.member_features["teacher"][kind]
            assert stored.dtype == torch.float32 and stored.shape == fresh.shape
            torch.testing.assert_close(stored, fresh, atol=2e-3, rtol=2e-3)  # float16 storage
        with torch.no_grad():
            labels = torch.zeros(len(images), dtype=torch.long)
            _, replayed_terms = trainer.distiller.forward_train(images, labels, out)
            _, live_terms = trainer.distiller.forward_train(images, labels, live)
        compared.append(tuple({k: v.item() for k, v in terms.items()} for terms in (replayed_terms, live_terms)))
        return out

    source.__class__ = type("ComparingSource", (type(source),), {"__call__": lambda _s, i, r: replay_and_compare(i, r)})
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    assert summary["completed"] and len(compared) == 3
    for replayed_terms, live_terms in compared:
        assert set(replayed_terms) == set(live_terms) == {"summary_teacher", "spatial_teacher"}
        for key in live_terms:
            assert replayed_terms[key] == pytest.approx(live_terms[key], rel=1e-3, abs=1e-5), key


def test_unlabelled_shards_can_be_taught(tmp_path, teacher_file):
    from kdscale.cli import main as cli

    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(raw / f"{i}.jpg")
    data = tmp_path / "shards"
    cli(["shards", "from-folder", str(raw), "--unlabelled", "--out", str(data), "--split", "train", "--max-count", "2",
         "--workers", "1", "--quiet"])
    taught = {}
    for labels in ("none", "required"):
        _, summary, _ = teach(str(data), str(tmp_path / labels), teacher_file, "targets: [summary]",
                              f"data.labels={labels}")
        taught[labels] = summary
    assert taught["none"]["samples_written"] == 5 and taught["none"]["samples_without_crops"] == 0
    assert taught["required"]["samples_without_crops"] == 5  # without data.labels=none they are bad samples


def test_replay_errors_are_one_line(synth_data, feature_outputs, tmp_path):
    from kdscale.train.setup import plan_data

    outputs = feature_outputs[0]
    with pytest.raises(KdscaleError, match=r"^teacher.targets=\['logits', 'summary'\], but the teacher outputs in "
                                           rf"{outputs} store summary, spatial \(no logits\); rewrite them with "
                                           r"kdscale.teach .* or set teacher.targets=\['summary'\]$"):
        plan_data(feature_run(synth_data, str(tmp_path), outputs, "teacher.targets=[logits, summary]"), 1)
    with pytest.raises(KdscaleError, match=r"^teacher.source=shards replays feature targets, which Mixup/CutMix "
                                           r"cannot mix \(data.mixup_alpha=0.2, data.cutmix_alpha=0.0\); set both to "
                                           r"0, or use teacher.source=online$"):
        plan_data(feature_run(synth_data, str(tmp_path), outputs, "data.mixup_alpha=0.2"), 1)
    with pytest.raises(KdscaleError, match=r"^teacher.targets=\[.logits.\], but the teacher outputs in .* store "
                                           r"summary, spatial \(no logits\)"):
        plan_data(make_config(synth_data, str(tmp_path), "method.name=kd", "data.augment=imagenet",
                              f"data.train_shards={synth_data}/{ONE_SHARD}",
                              f"teacher={{source: shards, outputs: {outputs}}}"), 1)


def test_a_kind_the_store_lacks_is_one_line(synth_data, teacher_file, tmp_path):
    from kdscale.runtime.device import Runtime
    from kdscale.train.setup import build_distiller

    outputs, _, _ = teach(synth_data, str(tmp_path), teacher_file, "targets: [summary]",
                          "data.train_shards=" + f"{synth_data}/train-000000.tar")
    cfg = feature_run(synth_data, str(tmp_path), outputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KdscaleError, match=r"^teacher.targets=\['summary', 'spatial'\], but the teacher outputs "
                                               r"in .* store summary \(no spatial\); .* or set "
                                               r"teacher.targets=\['summary'\]$"):
            build_distiller(cfg, Runtime(torch.device("cpu"), None, False))


def test_features_beyond_float16_are_refused(synth_data, tmp_path):
    """A teacher whose features overflow float16 (its last BN scaled by 1e6): one line, nothing stored as inf."""
    from kdscale.teach.run import teach as teach_run

    torch.manual_seed(5)
    model = build_model("resnet20", 10)
    with torch.no_grad():
        model.layer3[2].bn2.weight.mul_(1e6)
        model.layer3[2].bn2.bias.fill_(1e6)
    path = str(tmp_path / "loud.pt")
    torch.save(model.state_dict(), path)
    outputs = str(tmp_path / "outputs")
    cfg = make_config(synth_data, str(tmp_path), "method.name=features", "student.name=resnet8",
                      "data.augment=imagenet", f"data.train_shards={synth_data}/{ONE_SHARD}",
                      f"teacher={{name: resnet20, weights: {path}, outputs: {outputs}, crops_per_image: {R}, "
                      f"targets: [summary]}}", name="loud")
    with pytest.raises(KdscaleError, match=r"^teacher resnet20: its summary features on a crop of shard .*"
                                           r"train-000000.tar are not finite in float16"):
        teach_run(cfg)
    assert not os.path.exists(os.path.join(outputs, ONE_SHARD))
