"""`kdscale shards from-folder` and `verify`: exact round trip, index, resume, bad data."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from kdscale.cli import main as cli
from kdscale.data.loader import _samples_of
from kdscale.data.shards import expand_shards
from kdscale.errors import KdscaleError


@pytest.fixture()
def image_tree(tmp_path):
    """3 classes x 5 images, JPEG and PNG, odd names."""
    src = tmp_path / "src"
    originals = {}
    for c, name in enumerate(["n01440764", "n01443537", "zebra"]):
        (src / name).mkdir(parents=True)
        for i in range(5):
            suffix = ".png" if i == 4 else ".JPEG"
            path = src / name / f"img.{i}{suffix}"
            Image.new("RGB", (20 + i, 16), (40 * c, 20 * i, 7)).save(path)
            originals[path.read_bytes()] = c
    return src, originals


def test_from_folder_round_trip_and_index(image_tree, tmp_path, capsys):
    src, originals = image_tree
    out = tmp_path / "shards"
    cli(["shards", "from-folder", str(src), "--out", str(out), "--max-count", "4", "--workers", "2", "--quiet"])
    assert "wrote 15 samples in 4 shards (3 classes)" in capsys.readouterr().out
    index = json.load(open(out / "index.json"))
    assert index["classes"] == ["n01440764", "n01443537", "zebra"] and index["num_classes"] == 3
    split = index["splits"]["train"]
    shards = expand_shards(str(out / split["pattern"]), "k")
    assert [os.path.basename(p) for p in shards] == split["shards"]
    samples = list(_samples_of(shards))
    assert len(samples) == split["samples"] == 15
    read_back = {(s.get("jpg") or s.get("png")): int(s["cls"]) for s in samples}
    assert read_back == originals  # every image byte-identical, every label right
    assert "n01440764/img_0" in {s["__key__"] for s in samples}
    assert [r["samples"] for r in split["records"]] == [4, 4, 4, 3]
    cli(["shards", "verify", str(out / "train-*.tar"), "--quiet"])
    assert "verified 4 shards: 0 problem(s)" in capsys.readouterr().out


def test_from_folder_resumes(image_tree, tmp_path):
    src, _ = image_tree
    out = tmp_path / "shards"
    args = ["shards", "from-folder", str(src), "--out", str(out), "--max-count", "4", "--quiet"]
    cli(args)
    stamps = {p: os.path.getmtime(out / p) for p in os.listdir(out) if p.endswith(".tar")}
    os.remove(out / "train-000002.tar")  # as if interrupted before this shard was written
    cli(args)
    assert (out / "train-000002.tar").is_file()
    for name, stamp in stamps.items():
        if name != "train-000002.tar":
            assert os.path.getmtime(out / name) == stamp, f"{name} was rewritten"


def test_from_file_list(image_tree, tmp_path, capsys):
    src, _ = image_tree
    listing = tmp_path / "list.txt"
    listing.write_text(f"{src}/zebra/img.0.JPEG 7\n{src}/n01440764/img.1.JPEG 2\n")
    cli(["shards", "from-folder", str(tmp_path), "--file-list", str(listing), "--out", str(tmp_path / "o"),
         "--split", "val", "--quiet"])
    samples = list(_samples_of([str(tmp_path / "o" / "val-000000.tar")]))
    assert {s["__key__"]: int(s["cls"]) for s in samples} == {"src/zebra/img_0": 7, "src/n01440764/img_1": 2}
    listing.write_text(f"{src}/zebra/missing.JPEG 1\n")
    with pytest.raises(KdscaleError, match=r"list.txt:1: image not found: .*missing.JPEG"):
        from kdscale.data.folder_shards import items_from_list
        items_from_list(str(listing), None)


def test_verify_reports_bad_samples_by_key_and_shard(image_tree, tmp_path, capsys):
    import webdataset as wds

    src, _ = image_tree
    out = tmp_path / "shards"
    cli(["shards", "from-folder", str(src), "--out", str(out), "--max-count", "8", "--quiet"])
    good = open(src / "zebra" / "img.0.JPEG", "rb").read()
    with wds.TarWriter(str(out / "train-000002.tar")) as sink:  # an extra, damaged shard
        sink.write({"__key__": "broken", "jpg": good[:40], "cls": "1"})
        sink.write({"__key__": "wronglabel", "jpg": good, "cls": "9"})
        sink.write({"__key__": "zebra/img_0", "jpg": good, "cls": "2"})
    with open(out / "train-000000.tar", "r+b") as fh:  # damage a recorded shard in place
        fh.seek(700)
        fh.write(b"\x00garbage\x00")
    with pytest.raises(SystemExit) as exit_info:
        cli(["shards", "verify", str(out / "train-*.tar"), "--quiet"])
    assert exit_info.value.code == 1
    report = capsys.readouterr().out
    assert "train-000002.tar: sample broken: cannot decode the image" in report
    assert "train-000002.tar: sample wronglabel in" in report and "label 9 outside data.num_classes=3" in report
    assert "train-000002.tar: sample zebra/img_0 duplicates the one in" in report
    assert "train-000000.tar: checksum differs from" in report
