"""Dataset import: `kdscale shards from-torchvision`, `from-hf`, and ImageNet's flat val folder
through `from-folder --labels`. Every dataset is written tiny by the test, in its real on-disk
format (CIFAR pickles, SVHN .mat, MNIST idx, STL10 binaries, Hub parquet, save_to_disk arrow);
the shards are read back (counts, labels, pixels, index.json) and pass `kdscale shards verify`.

torchvision checks each file's md5 against the real dataset's, which tiny files cannot match:
the tests that convert replace `torchvision.datasets.utils.check_md5` (only that; files must
still exist and parse), and one test keeps it to see the checksum error.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from kdscale.cli import main as cli
from kdscale.data.loader import _samples_of
from kdscale.data.shards import expand_shards

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture()
def no_md5(monkeypatch):
    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tv_utils, "check_md5", lambda fpath, md5, **kwargs: True)


def images(rng, n: int, side: int, channels: int = 3, block: int = 8) -> np.ndarray:
    """uint8 (n, side, side, channels): random blocks plus a ramp (JPEG-friendly, not trivial)."""
    cells = rng.integers(0, 256, (n, side // block, side // block, channels))
    pixels = np.kron(cells, np.ones((1, block, block, 1))) * 0.8 + np.linspace(0, 50, side)[None, None, :, None]
    return pixels.clip(0, 255).astype(np.uint8)


def read_split(out, split: str) -> list[dict]:
    index = json.load(open(os.path.join(out, "index.json")))
    entry = index["splits"][split]
    shards = expand_shards(os.path.join(out, entry["pattern"]), "k")
    samples = list(_samples_of(shards))
    assert len(samples) == entry["samples"] == sum(r["samples"] for r in entry["records"])
    for record in entry["records"]:
        assert set(record) >= {"name", "samples", "bytes", "sha256"}
    return sorted(samples, key=lambda s: s["__key__"])


def decoded(sample: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample["jpg"])))


def assert_pixels_close(sample: dict, original: np.ndarray) -> None:
    got = decoded(sample).astype(int)
    want = original.astype(int).reshape(got.shape)  # grayscale: (h, w, 1) -> (h, w)
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 2.0 and np.abs(got - want).max() <= 24


def assert_verifies(out, capsys) -> None:
    capsys.readouterr()
    for split in json.load(open(os.path.join(out, "index.json")))["splits"]:
        cli(["shards", "verify", os.path.join(out, f"{split}-*.tar"), "--quiet"])
        assert " 0 problem(s)" in capsys.readouterr().out


def user_error(args, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ---- torchvision formats, written as torchvision stores them ----

def write_cifar10(root, rng, per_batch: int = 4, test: int = 6) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    truth = {"train": ([], []), "val": ([], [])}
    for name, count, split in [(f"data_batch_{i}", per_batch, "train") for i in range(1, 6)] + [
            ("test_batch", test, "val")]:
        pixels, labels = images(rng, count, 32), [int(v) for v in rng.integers(0, 10, count)]
        data = pixels.transpose(0, 3, 1, 2).reshape(count, 3072)  # rows of R, G, B planes, as CIFAR stores them
        with open(folder / name, "wb") as fh:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"img_{i}.png" for i in range(count)]}, fh)
        truth[split][0].extend(pixels)
        truth[split][1].extend(labels)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": CIFAR10_NAMES, "num_cases_per_batch": per_batch, "num_vis": 3072}, fh)
    return truth


def check_import(out, truth: dict, classes: list[str], capsys) -> None:
    index = json.load(open(out / "index.json"))
    assert index["classes"] == classes and index["num_classes"] == len(classes)
    assert index["generator"] == "kdscale from-torchvision" and set(index["splits"]) == {"train", "val"}
    for split, (pixels, labels) in truth.items():
        samples = read_split(out, split)
        assert [s["__key__"] for s in samples] == [f"{split}/{i:06d}" for i in range(len(labels))]
        assert [int(s["cls"]) for s in samples] == labels
        for sample, original in zip(samples, pixels):
            assert_pixels_close(sample, original)
    assert_verifies(out, capsys)


def test_cifar10_and_cifar100(tmp_path, no_md5, capsys):
    rng = np.random.default_rng(0)
    truth = write_cifar10(tmp_path / "tv", rng)
    out = tmp_path / "c10"
    cli(["shards", "from-torchvision", "CIFAR10", "--root", str(tmp_path / "tv"), "--out", str(out),
         "--max-count", "8", "--quiet"])
    assert "wrote 20 train / 6 val samples (10 classes)" in capsys.readouterr().out
    check_import(out, truth, CIFAR10_NAMES, capsys)
    assert decoded(read_split(out, "train")[0]).shape == (32, 32, 3)  # kept at 32x32
    assert len(json.load(open(out / "index.json"))["splits"]["train"]["records"]) == 3

    folder = tmp_path / "tv" / "cifar-100-python"
    folder.mkdir()
    names = [f"class_{i:02d}" for i in range(100)]
    truth = {}
    for file, split, count in (("train", "train", 7), ("test", "val", 5)):
        pixels, labels = images(rng, count, 32), [int(v) for v in rng.integers(0, 100, count)]
        with open(folder / file, "wb") as fh:
            pickle.dump({"filenames": [f"{i}.png" for i in range(count)], "batch_label": file,
                         "fine_labels": labels, "coarse_labels": [v // 5 for v in labels],
                         "data": pixels.transpose(0, 3, 1, 2).reshape(count, 3072)}, fh)
        truth[split] = (list(pixels), labels)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": names, "coarse_label_names": [f"super_{i}" for i in range(20)]}, fh)
    out = tmp_path / "c100"
    cli(["shards", "from-torchvision", "cifar100", "--root", str(tmp_path / "tv"), "--out", str(out), "--quiet"])
    check_import(out, truth, names, capsys)


def test_missing_incomplete_and_corrupt_folders_are_one_clear_line(tmp_path, capsys):
    args = ["shards", "from-torchvision", "CIFAR10", "--root", str(tmp_path / "tv"), "--out", str(tmp_path / "o")]
    line = user_error(args, capsys)
    assert f"CIFAR10: folder {tmp_path / 'tv' / 'cifar-10-batches-py'} not found" in line
    assert "missing data_batch_1, data_batch_2" in line and "--download" in line
    assert "extract cifar-10-python.tar.gz" in line
    write_cifar10(tmp_path / "tv", np.random.default_rng(1))
    os.remove(tmp_path / "tv" / "cifar-10-batches-py" / "data_batch_3")
    line = user_error(args, capsys)
    assert "cifar-10-batches-py is incomplete: missing data_batch_3; fix: add --download" in line
    (tmp_path / "tv" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"partial")
    line = user_error(args, capsys)  # torchvision's md5 check, kept in this test
    assert "fail torchvision's checksum" in line and "data_batch_3" in line and "--download" in line
    assert not (tmp_path / "o").exists()
    line = user_error(["shards", "from-torchvision", "ImageNette", "--root", str(tmp_path), "--out", "o"], capsys)
    assert "unknown torchvision dataset 'ImageNette'; supported: CIFAR10, CIFAR100, SVHN" in line
    line = user_error(["shards", "from-torchvision", "MNIST", "--root", str(tmp_path), "--out", "o"], capsys)
    assert f"{tmp_path / 'MNIST' / 'raw'} not found: missing train-images-idx3-ubyte" in line


def test_svhn_mat_files(tmp_path, no_md5, capsys, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io")  # torchvision reads SVHN with scipy
    rng = np.random.default_rng(2)
    truth = {}
    for file, split, count in (("train_32x32.mat", "train", 9), ("test_32x32.mat", "val", 4)):
        pixels = images(rng, count, 32)
        digits = rng.integers(0, 10, count)
        digits[0] = 0  # SVHN stores the digit 0 as label 10
        scipy_io.savemat(tmp_path / file, {"X": pixels.transpose(1, 2, 3, 0),
                                           "y": np.where(digits == 0, 10, digits).reshape(-1, 1).astype(np.uint8)})
        truth[split] = (list(pixels), [int(d) for d in digits])
    cli(["shards", "from-torchvision", "SVHN", "--root", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"])
    check_import(tmp_path / "o", truth, [str(d) for d in range(10)], capsys)

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    line = user_error(["shards", "from-torchvision", "SVHN", "--root", str(tmp_path), "--out", "o"], capsys)
    assert "SVHN: torchvision reads SVHN's .mat files with scipy, which is not installed; fix: pip install" in line


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(f"{path}.gz", "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST"])
def test_mnist_idx_files(tmp_path, no_md5, capsys, name):
    rng = np.random.default_rng(3)
    raw = tmp_path / name / "raw"
    raw.mkdir(parents=True)
    truth = {}
    for prefix, split, count in (("train", "train", 10), ("t10k", "val", 5)):
        pixels, labels = images(rng, count, 28, 1, block=4), rng.integers(0, 10, count)
        # MNIST as downloaded by hand: still gzipped (unpacked as torchvision's downloader does)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", pixels[..., 0], gz=name == "FashionMNIST")
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, gz=name == "FashionMNIST")
        truth[split] = (list(pixels), [int(v) for v in labels])
    cli(["shards", "from-torchvision", name, "--root", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"])
    import torchvision.datasets as tvd

    check_import(tmp_path / "o", truth, list(getattr(tvd, name).classes), capsys)
    sample = read_split(tmp_path / "o", "train")[0]
    assert Image.open(io.BytesIO(sample["jpg"])).mode == "L"  # grayscale JPEG; the loader converts to RGB


def test_stl10_binaries(tmp_path, no_md5, capsys):
    rng = np.random.default_rng(4)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    truth = {}
    for prefix, split, count in (("train", "train", 5), ("test", "val", 3)):
        pixels, labels = images(rng, count, 96), rng.integers(0, 10, count)
        (folder / f"{prefix}_X.bin").write_bytes(pixels.transpose(0, 3, 2, 1).tobytes())  # column-major planes
        (folder / f"{prefix}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())  # 1-based
        truth[split] = (list(pixels), [int(v) for v in labels])
    (folder / "unlabeled_X.bin").write_bytes(images(rng, 1, 96).tobytes())
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    cli(["shards", "from-torchvision", "STL10", "--root", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"])
    check_import(tmp_path / "o", truth, names, capsys)


# ---- Hugging Face datasets on disk ----

def encoded(rng, fmt: str, side: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(images(rng, 1, side)[0]).save(buffer, format=fmt)
    return buffer.getvalue()


def hf_metadata(features: dict) -> dict:
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


def test_hf_parquet_hub_layout(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(5)
    names = ["cat", "dog", "fox"]
    features = {"image": {"decode": True, "id": None, "_type": "Image"},
                "label": {"names": names, "id": None, "_type": "ClassLabel"}}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    data = tmp_path / "hf" / "data"
    data.mkdir(parents=True)
    truth = {}
    for file, split, count, labelled in (("train-00000-of-00002", "train", 7, True),
                                         ("train-00001-of-00002", "train", 5, True),
                                         ("validation-00000-of-00001", "val", 4, True),
                                         ("test-00000-of-00001", "test", 3, False)):
        blobs = [encoded(rng, "PNG" if i % 3 == 0 else "JPEG") for i in range(count)]
        labels = [int(v) for v in rng.integers(0, 3, count)] if labelled else [-1] * count
        table = pa.table({"image": pa.array([{"bytes": b, "path": f"{file}_{i}.jpg"} for i, b in enumerate(blobs)],
                                            type=image_type), "label": pa.array(labels, pa.int64())})
        pq.write_table(table.replace_schema_metadata(hf_metadata(features)), data / f"{file}.parquet",
                       row_group_size=3)  # several row groups: shards read only the ones they need
        old_blobs, old_labels = truth.get(split, ([], []))
        truth[split] = (old_blobs + blobs, old_labels + labels)
    out = tmp_path / "o"
    cli(["shards", "from-hf", "--path", str(tmp_path / "hf"), "--out", str(out), "--max-count", "5", "--quiet"])
    printed = capsys.readouterr().out
    assert "skipping split test: 3 of 3 rows have no label" in printed
    assert "wrote 12 train / 4 val samples (3 classes)" in printed
    index = json.load(open(out / "index.json"))
    assert index["classes"] == names and index["generator"] == "kdscale from-hf"
    assert set(index["splits"]) == {"train", "val"} and len(index["splits"]["train"]["records"]) == 3
    for split in ("train", "val"):
        samples = read_split(out, split)
        assert [s["__key__"] for s in samples] == [f"{split}/{i:08d}" for i in range(len(samples))]
        blobs, labels = truth[split]
        assert [int(s["cls"]) for s in samples] == labels
        assert [s.get("jpg") or s.get("png") for s in samples] == blobs  # the Hub's bytes, not re-encoded
        assert [("png" in s) for s in samples] == [b.startswith(b"\x89PNG") for b in blobs]
    assert_verifies(out, capsys)
    line = user_error(["shards", "from-hf", "--path", str(tmp_path / "hf"), "--out", str(out), "--split", "test"],
                      capsys)
    assert "split test: 3 of 3 rows have no label" in line


def test_hf_save_to_disk_arrow(tmp_path, capsys):
    import pyarrow as pa

    rng = np.random.default_rng(6)
    fine = [f"fine_{i}" for i in range(4)]
    features = {"img": {"decode": True, "id": None, "_type": "Image"},
                "fine_label": {"names": fine, "id": None, "_type": "ClassLabel"},
                "coarse_label": {"names": ["a", "b"], "id": None, "_type": "ClassLabel"}}
    root = tmp_path / "saved"
    truth = {}
    for split, count in (("train", 9), ("test", 4)):
        folder = root / split
        folder.mkdir(parents=True)
        pixels = images(rng, count, 32)
        blobs = []
        for array in pixels:
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            blobs.append(buffer.getvalue())
        labels = [int(v) for v in rng.integers(0, 4, count)]
        table = pa.table({"img": pa.array([{"bytes": b, "path": None} for b in blobs],
                                          type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                          "fine_label": pa.array(labels, pa.int64()),
                          "coarse_label": pa.array([v // 2 for v in labels], pa.int64())})
        with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:  # an IPC stream, as datasets writes
            with pa.ipc.new_stream(sink, table.schema) as writer:
                for batch in table.to_batches(max_chunksize=4):
                    writer.write_batch(batch)
        (folder / "dataset_info.json").write_text(json.dumps({"features": features}))  # no schema metadata here
        (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                       "_split": split, "_fingerprint": "0"}))
        truth["val" if split == "test" else split] = (blobs, labels)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    out = tmp_path / "o"
    args = ["shards", "from-hf", "--path", str(root), "--out", str(out), "--max-count", "4", "--quiet"]
    line = user_error(args, capsys)  # two ClassLabel columns: which one is the label?
    assert "no label column found (columns: img, fine_label, coarse_label); fix: pass --label-column" in line
    cli(args + ["--label-column", "fine_label"])
    assert "wrote 9 train / 4 val samples (4 classes)" in capsys.readouterr().out
    assert json.load(open(out / "index.json"))["classes"] == fine
    for split, (blobs, labels) in truth.items():
        samples = read_split(out, split)
        assert [int(s["cls"]) for s in samples] == labels and [s["png"] for s in samples] == blobs
    assert_verifies(out, capsys)


# ---- ImageNet's official layout: class folders for train, a flat val folder with a label file ----

def test_imagenet_flat_val_with_label_files(tmp_path, capsys):
    wnids = ["n01440764", "n01443537", "n01484850"]  # sorted: the class indices of the train split
    rng = np.random.default_rng(7)
    for wnid in wnids:
        (tmp_path / "train" / wnid).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(images(rng, 1, 16)[0]).save(tmp_path / "train" / wnid / f"{wnid}_{i}.JPEG")
    (tmp_path / "val").mkdir()
    val_wnids = ["n01484850", "n01440764", "n01484850", "n01443537", "n01440764", "n01484850"]
    for i in range(1, 7):
        Image.fromarray(images(rng, 1, 16)[0]).save(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    want = {f"ILSVRC2012_val_{i:08d}": wnids.index(w) for i, w in enumerate(val_wnids, start=1)}

    def convert(labels, name, subset=False):
        out = tmp_path / name
        cli(["shards", "from-folder", str(tmp_path / "train"), "--out", str(out), "--quiet"])
        cli(["shards", "from-folder", str(tmp_path / "val"), "--labels", str(labels), "--out", str(out),
             "--split", "val", "--quiet"])
        index = json.load(open(out / "index.json"))
        assert index["classes"] == wnids and index["splits"]["val"]["samples"] == (3 if subset else 6)
        assert_verifies(out, capsys)
        return {s["__key__"]: int(s["cls"]) for s in read_split(out, "val")}

    lines = tmp_path / "val_labels.txt"
    lines.write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG {w}\n" for i, w in enumerate(val_wnids, start=1)))
    assert convert(lines, "plain") == want
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i:08d},{w} 10 20 200 300 {w} 5 5 50 50 \n" for i, w in enumerate(val_wnids, start=1)))
    assert convert(csv, "kaggle") == want

    scipy_io = pytest.importorskip("scipy.io")
    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    ids = {"n01484850": 1, "n01440764": 2, "n01443537": 3}  # the devkit's order is not the sorted one
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "wordnet_height", "num_train_images"]
    rows = [(ids[w], w, w, "", 0, 0, 2) for w in wnids] + [(1001, "n00001740", "entity", "", 3, 18, 0)]
    synsets = np.array(rows, dtype=[(f, object) for f in fields])
    scipy_io.savemat(devkit / "meta.mat", {"synsets": synsets})
    truth_file = devkit / "ILSVRC2012_validation_ground_truth.txt"
    truth_file.write_text("".join(f"{ids[w]}\n" for w in val_wnids))
    assert convert(truth_file, "devkit") == want

    # a val list that lacks class 0 keeps the train split's indices
    lines.write_text("ILSVRC2012_val_00000001.JPEG n01484850\nILSVRC2012_val_00000004.JPEG n01443537\n"
                     "ILSVRC2012_val_00000006.JPEG n01484850\n")
    assert set(convert(lines, "subset", subset=True).values()) == {1, 2}
    lines.write_text("ILSVRC2012_val_00000001.JPEG n09999999\n")
    line = user_error(["shards", "from-folder", str(tmp_path / "val"), "--labels", str(lines), "--out",
                       str(tmp_path / "plain"), "--split", "val"], capsys)
    assert "val_labels.txt:1: class 'n09999999' is not one of the 3 classes of the index" in line


# ---- the imported set trains ----

@pytest.mark.slow
def test_imported_cifar10_trains(tmp_path, no_md5):
    from helpers.common import make_config

    from kdscale.train.loop import Trainer

    write_cifar10(tmp_path / "tv", np.random.default_rng(8), per_batch=32, test=64)
    out = tmp_path / "c10"
    cli(["shards", "from-torchvision", "CIFAR10", "--root", str(tmp_path / "tv"), "--out", str(out),
         "--max-count", "40", "--quiet"])
    summary = Trainer(make_config(str(out), str(tmp_path / "runs"), "student.name=resnet8", "train.epochs=1",
                                  "data.augment=cifar", name="cifar")).train()
    assert summary["completed"] and summary["step"] == 160 // 32
    assert summary["metrics"]["val/samples"] == 64
