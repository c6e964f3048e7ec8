"""Label-free training shards (issue 27): `from-folder --unlabelled` and `from-hf` without a
label column (or with `--unlabelled`) write samples without `.cls` and mark the split
`"labelled": false` in index.json; the training loader takes them with `data.labels=none`
(target -1) and counts them as bad samples with `required`; `plan_data` refuses, in one line,
`none` with a method that needs labels or with Mixup/CutMix, and `required` on unlabelled
training shards. Every dataset is written tiny by the test."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers.common import make_config
from PIL import Image
from test_dataset_import import encoded, hf_metadata, images, read_split, user_error

from kdscale.cli import main as cli
from kdscale.config.schema import DataSection
from kdscale.data.bad_samples import BadSampleLog
from kdscale.data.loader import TrainStream, ValStream, _samples_of, valid_samples
from kdscale.data.shards import expand_shards, samples_from_index
from kdscale.errors import KdscaleError

# any layout: a file at the top, nested folders of different depths, every image suffix
TREE = {"top.jpg": "JPEG", "sub/b.jpeg": "JPEG", "sub/deeper/c.png": "PNG", "x/y/z/d.webp": "WEBP",
        "x/e.JPG": "JPEG", "notes.txt": None}
KEYS = ["sub/b", "sub/deeper/c", "top", "x/e", "x/y/z/d"]  # path below SRC without the extension, sorted


def write_tree(root, rng) -> dict[str, bytes]:
    """The TREE's images (40x40, PIL) under ``root``; key -> the file's bytes."""
    blobs = {}
    for rel, fmt in TREE.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt is None:
            path.write_text("not an image")
            continue
        path.write_bytes(encoded(rng, fmt, side=40))
        blobs[os.path.splitext(rel)[0]] = path.read_bytes()
    return blobs


def write_class_tree(root, rng, classes=("cat", "dog"), per_class: int = 2) -> None:
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.jpg").write_bytes(encoded(rng, "JPEG", side=40))


def image_bytes(sample: dict) -> bytes:
    return next(sample[ext] for ext in ("jpg", "png", "webp") if ext in sample)


@pytest.fixture()
def unlabelled_set(tmp_path):
    """An unlabelled train split (5 images, 3 shards) and a labelled val split (2 classes) in one --out."""
    rng = np.random.default_rng(0)
    blobs = write_tree(tmp_path / "raw", rng)
    write_class_tree(tmp_path / "val", rng)
    out = tmp_path / "shards"
    cli(["shards", "from-folder", str(tmp_path / "raw"), "--unlabelled", "--out", str(out), "--split", "train",
         "--max-count", "2", "--workers", "1", "--quiet"])
    cli(["shards", "from-folder", str(tmp_path / "val"), "--out", str(out), "--split", "val", "--workers", "1",
         "--quiet"])
    return out, blobs


def test_from_folder_unlabelled(tmp_path, capsys):
    rng = np.random.default_rng(1)
    blobs = write_tree(tmp_path / "raw", rng)
    out = tmp_path / "o"
    args = ["shards", "from-folder", str(tmp_path / "raw"), "--unlabelled", "--out", str(out), "--split", "train",
            "--max-count", "2", "--workers", "1", "--quiet"]
    cli(args)
    assert "wrote 5 samples in 3 shards (unlabelled)" in capsys.readouterr().out
    index = json.load(open(out / "index.json"))
    assert index["splits"]["train"]["labelled"] is False
    assert index["classes"] == [] and index["num_classes"] == 0 and index["generator"] == "kdscale from-folder"
    samples = read_split(out, "train")
    assert [s["__key__"] for s in samples] == KEYS
    assert not any("cls" in s for s in samples)
    assert {s["__key__"]: image_bytes(s) for s in samples} == blobs  # the original bytes
    assert samples_from_index(expand_shards(str(out / "train-*.tar"), "k"), "train") == 5
    # rerun: nothing rewritten; another --out: the same keys in the same shards
    before = {p: os.path.getmtime(p) for p in expand_shards(str(out / "train-*.tar"), "k")}
    cli(args)
    assert {p: os.path.getmtime(p) for p in before} == before
    cli(args[:5] + [str(tmp_path / "again")] + args[6:])
    again = json.load(open(tmp_path / "again" / "index.json"))["splits"]["train"]
    assert again["shards"] == index["splits"]["train"]["shards"]
    assert [s["__key__"] for s in read_split(tmp_path / "again", "train")] == KEYS
    # a labelled split written beside it brings the class list; the unlabelled split stays unlabelled
    write_class_tree(tmp_path / "val", rng)
    cli(["shards", "from-folder", str(tmp_path / "val"), "--out", str(out), "--split", "val", "--quiet"])
    assert "(2 classes)" in capsys.readouterr().out
    index = json.load(open(out / "index.json"))
    assert index["classes"] == ["cat", "dog"] and index["num_classes"] == 2
    assert index["splits"]["train"]["labelled"] is False and index["splits"]["val"]["labelled"] is True
    assert [int(s["cls"]) for s in read_split(out, "val")] == [0, 0, 1, 1]
    line = user_error(["shards", "from-folder", str(tmp_path / "raw"), "--unlabelled", "--file-list", "x.txt",
                       "--out", str(out)], capsys)
    assert "--unlabelled takes the images' folder" in line


def write_parquet(folder, rng, splits, with_label: bool) -> dict[str, list[bytes]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {"image": {"decode": True, "id": None, "_type": "Image"}}
    if with_label:
        features["label"] = {"names": ["a", "b"], "id": None, "_type": "ClassLabel"}
    truth = {}
    for file, count, labelled in splits:
        blobs = [encoded(rng, "PNG" if i % 2 else "JPEG") for i in range(count)]
        columns = {"image": pa.array([{"bytes": b, "path": None} for b in blobs], type=image_type),
                   "caption": pa.array([f"image {i}" for i in range(count)])}
        if with_label:
            columns["label"] = pa.array([i % 2 if labelled else -1 for i in range(count)], pa.int64())
        table = pa.table(columns)
        pq.write_table(table.replace_schema_metadata(hf_metadata(features)), folder / f"{file}.parquet",
                       row_group_size=2)
        truth[file.split("-")[0]] = blobs
    return truth


def test_from_hf_without_label_column(tmp_path, capsys):
    rng = np.random.default_rng(2)
    truth = write_parquet(tmp_path / "hf" / "data", rng, [("train-00000-of-00001", 5, False),
                                                          ("test-00000-of-00001", 3, False)], with_label=False)
    out = tmp_path / "o"
    cli(["shards", "from-hf", "--path", str(tmp_path / "hf"), "--out", str(out), "--max-count", "2", "--quiet"])
    printed = capsys.readouterr().out
    assert "no label column ('label' or a ClassLabel column; columns: image, caption)" in printed
    assert "wrote 3 val / 5 train samples (unlabelled: val, train)" in printed
    index = json.load(open(out / "index.json"))
    assert index["source"]["label_column"] is None and index["classes"] == []
    for split, name in (("train", "train"), ("val", "test")):
        assert index["splits"][split]["labelled"] is False
        samples = read_split(out, split)
        assert [s["__key__"] for s in samples] == [f"{split}/{i:08d}" for i in range(len(truth[name]))]
        assert not any("cls" in s for s in samples)
        assert [image_bytes(s) for s in samples] == truth[name]


def test_from_hf_unlabelled_flag(tmp_path, capsys):
    rng = np.random.default_rng(3)
    truth = write_parquet(tmp_path / "hf" / "data", rng, [("train-00000-of-00001", 4, True),
                                                          ("test-00000-of-00001", 3, False)], with_label=True)
    path = str(tmp_path / "hf")
    # with labels: the unlabelled test split is skipped as before; asked for by name, the error names the flag
    line = user_error(["shards", "from-hf", "--path", path, "--out", str(tmp_path / "x"), "--split", "test"], capsys)
    assert "split test: 3 of 3 rows have no label" in line and "--unlabelled" in line
    line = user_error(["shards", "from-hf", "--path", path, "--out", str(tmp_path / "x"), "--unlabelled",
                       "--label-column", "label"], capsys)
    assert "--unlabelled writes no labels" in line
    out = tmp_path / "o"
    cli(["shards", "from-hf", "--path", path, "--out", str(out), "--unlabelled", "--quiet"])
    assert "wrote 3 val / 4 train samples (unlabelled: val, train)" in capsys.readouterr().out
    for split, name in (("train", "train"), ("val", "test")):
        assert json.load(open(out / "index.json"))["splits"][split]["labelled"] is False
        samples = read_split(out, split)
        assert [s["__key__"] for s in samples] == [f"{split}/{i:08d}" for i in range(len(truth[name]))]
        assert not any("cls" in s for s in samples) and [image_bytes(s) for s in samples] == truth[name]


def loader_data(out, **kw) -> DataSection:
    base = dict(train_shards=f"{out}/train-*.tar", val_shards=f"{out}/val-*.tar", num_classes=2, batch_size=4,
                num_workers=0, shuffle_buffer=1, image_size=32, augment="imagenet")
    return DataSection(**{**base, **kw})


def test_loader_with_and_without_labels(unlabelled_set):
    out, _ = unlabelled_set
    train = expand_shards(f"{out}/train-*.tar", "k")
    val = expand_shards(f"{out}/val-*.tar", "k")
    # data.labels=none: unlabelled samples have target -1, labelled ones keep their label, none is bad
    data = loader_data(out, labels="none")
    stream = TrainStream(train + val, data, seed=0, epoch=0, rank=0, world_size=1, batches_per_rank=6)
    batches = list(stream)
    assert sum(b.bad_samples for b in batches) == 0 and all(b.images.shape == (4, 3, 32, 32) for b in batches)
    seen = {key: int(t) for b in batches for key, t in zip(b.keys, b.targets, strict=True)}
    assert seen == {**dict.fromkeys(KEYS, -1), "cat/0": 0, "cat/1": 0, "dog/0": 1, "dog/1": 1}
    # data.labels=required: each is a bad sample, as before
    bad = BadSampleLog(100)
    assert list(valid_samples(_samples_of(train), 2, bad)) == [] and bad.count == 5
    assert all("no label (.cls)" in what for what in bad.seen)
    with pytest.raises(KdscaleError, match="hold no usable samples"):
        list(TrainStream(train, loader_data(out), seed=0, epoch=0, rank=0, world_size=1, batches_per_rank=1))
    # validation always needs labels, whatever data.labels says
    val_batches = list(ValStream(train, data, rank=0, world_size=1))
    assert sum(len(b.keys) for b in val_batches) == 0 and sum(b.bad_samples for b in val_batches) == 5


@pytest.fixture()
def label_free_kd():
    """A throwaway method that needs no labels (KD with ``needs_labels = False``), registered for one test."""
    from kdscale.methods.base import METHODS, register_method
    from kdscale.methods.kd import KD

    cls = register_method(type("LabelFreeKD", (KD,), {"name": "test_label_free_kd", "needs_labels": False}))
    yield cls.name
    METHODS.pop(cls.name)


def plan(out, tmp_path, *extra):
    from kdscale.train.setup import plan_data

    cfg = make_config(str(out), str(tmp_path / "runs"), "data.num_classes=2", "data.batch_size=2",
                      "teacher.name=resnet8", *extra)
    return plan_data(cfg, world_size=1)


def one_line_error(out, tmp_path, *extra) -> str:
    with pytest.raises(KdscaleError) as info:
        plan(out, tmp_path, *extra)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_plan_data_refusals(unlabelled_set, tmp_path, label_free_kd):
    out, _ = unlabelled_set
    # (a) data.labels=none with a method that needs labels
    line = one_line_error(out, tmp_path, "method.name=kd", "data.labels=none")
    assert "data.labels=none" in line and "method 'kd' needs labels" in line
    assert "use a method that needs none, or labelled shards with data.labels=required" in line
    # (b) data.labels=required on shards index.json records as unlabelled
    line = one_line_error(out, tmp_path, "method.name=kd")
    assert f"the shards in {out} are unlabelled" in line and "data.labels=required" in line
    assert "use data.labels=none with a method that needs no labels, or labelled shards" in line
    line = one_line_error(out, tmp_path, f"method.name={label_free_kd}")  # the method alone does not change that
    assert "are unlabelled" in line
    # mixing builds soft targets from labels
    for key in ("data.mixup_alpha", "data.cutmix_alpha"):
        line = one_line_error(out, tmp_path, f"method.name={label_free_kd}", "data.labels=none", f"{key}=0.2")
        assert "data.labels=none with Mixup/CutMix" in line and f"{key}=0.2" in line and "set both to 0" in line
    # a method that needs no labels trains on them with data.labels=none
    planned = plan(out, tmp_path, f"method.name={label_free_kd}", "data.labels=none")
    assert planned.train_samples == 5 and planned.steps_per_epoch == 2
    # labelled shards with data.labels=none: refused for kd, planned for the label-free method
    line = one_line_error(out, tmp_path, "method.name=kd", "data.labels=none", f"data.train_shards={out}/val-*.tar")
    assert "method 'kd' needs labels" in line
    planned = plan(out, tmp_path, f"method.name={label_free_kd}", f"data.train_shards={out}/val-*.tar",
                   "data.train_samples=4")
    assert planned.train_samples == 4


def test_only_features_without_ce_trains_without_labels():
    from kdscale.methods import METHODS

    free = [name for name, cls in METHODS.items() if not cls.labels_needed(cls.Params())]
    assert free == ["features"]
    features = METHODS["features"]
    assert features.labels_needed(features.Params(ce_weight=0.5))  # its CE term reads labels


def test_verify_accepts_unlabelled_shards_and_still_flags_unlabelled_samples_of_labelled_ones(tmp_path, capsys):
    from kdscale.data.verify import verify_shards

    rng = np.random.default_rng(2)
    write_tree(tmp_path / "raw", rng)
    out = tmp_path / "o"
    cli(["shards", "from-folder", str(tmp_path / "raw"), "--unlabelled", "--out", str(out), "--split", "train",
         "--max-count", "2", "--workers", "1", "--quiet"])
    shards = expand_shards(str(out / "train-*.tar"), "k")
    assert verify_shards(shards, 10, workers=1, progress=False) == []
    index = json.load(open(out / "index.json"))
    index["splits"]["train"]["labelled"] = True  # the same shards recorded as labelled: every sample lacks its label
    json.dump(index, open(out / "index.json", "w"))
    problems = verify_shards(shards, 10, workers=2, progress=False)
    assert len(problems) == 5 and all("no label (.cls)" in p for p in problems)
