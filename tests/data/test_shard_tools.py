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


def _cut_points(path) -> dict[str, int]:
    """Byte offsets to truncate a shard at: inside a header, at a member boundary (a
    streaming reader sees a shorter valid archive there), inside member data, just
    before the end-of-archive marker, and inside the marker."""
    import tarfile

    with tarfile.open(path) as tar:
        members = tar.getmembers()
    last = members[-1]
    marker = last.offset_data + -(-last.size // 512) * 512
    big = max(members, key=lambda m: m.size)
    return {"empty": 0, "inside header": members[1].offset + 100, "member boundary": members[1].offset,
            "inside data": big.offset_data + big.size // 2, "before marker": marker,
            "inside marker": marker + 700, "between marker blocks": marker + 512}


def _verify(pattern, *extra):
    with pytest.raises(SystemExit) as exit_info:
        cli(["shards", "verify", pattern, "--workers", "1", "--quiet", *extra])
    assert exit_info.value.code == 1


def _assert_every_cut_fails(out, shard, fix, capsys):
    """Truncate ``shard`` at each cut point; verify must fail naming it, with and without index.json."""
    pristine = (out / shard).read_bytes()
    num_classes = str(json.load(open(out / "index.json"))["num_classes"])
    for where, offset in _cut_points(out / shard).items():
        (out / shard).write_bytes(pristine[:offset])
        _verify(str(out / "*.tar"))
        report = capsys.readouterr().out
        assert f"{shard}: incomplete tar:" in report, (where, report)
        assert f"{shard}: {offset} bytes, {out / 'index.json'} records {len(pristine)} (truncated)" in report
        assert fix in report, (where, report)
        os.rename(out / "index.json", out / "index.hidden")
        try:  # the tar layout alone tells, with no index.json to compare against
            _verify(str(out / "*.tar"), "--num-classes", num_classes)
            report = capsys.readouterr().out
            assert f"{shard}: incomplete tar:" in report and "fix: re-write the shard" in report, (where, report)
        finally:
            os.rename(out / "index.hidden", out / "index.json")
    (out / shard).write_bytes(pristine)
    cli(["shards", "verify", str(out / "*.tar"), "--workers", "1", "--quiet"])
    assert "0 problem(s)" in capsys.readouterr().out


def test_index_records_size_and_checksum_of_every_shard(image_tree, tmp_path):
    from kdscale.data.shards import file_sha256
    from kdscale.data.synth import write_synthetic_shards

    synth, folder = tmp_path / "synth", tmp_path / "folder"
    write_synthetic_shards(str(synth), num_classes=3, train_samples=10, val_samples=4, image_size=16,
                           samples_per_shard=4, progress=False)
    cli(["shards", "from-folder", str(image_tree[0]), "--out", str(folder), "--max-count", "6", "--quiet"])
    for out in (synth, folder):
        index = json.load(open(out / "index.json"))
        for split in index["splits"].values():
            assert [r["name"] for r in split["records"]] == split["shards"]
            assert sum(r["samples"] for r in split["records"]) == split["samples"]
            for record in split["records"]:
                assert record["bytes"] == os.path.getsize(out / record["name"])
                assert record["sha256"] == file_sha256(str(out / record["name"]))


def test_verify_fails_synthetic_shards_truncated_anywhere(tmp_path, capsys):
    from kdscale.data.synth import write_synthetic_shards

    out = tmp_path / "synth"
    write_synthetic_shards(str(out), num_classes=3, train_samples=10, val_samples=4, image_size=16,
                           samples_per_shard=4, progress=False)
    cli(["shards", "verify", str(out / "*.tar"), "--workers", "1", "--quiet"])
    assert "verified 4 shards: 0 problem(s)" in capsys.readouterr().out
    _assert_every_cut_fails(out, "train-000001.tar", "re-write the set with the same `kdscale shards synth`", capsys)


def test_verify_fails_folder_shards_truncated_anywhere_and_from_folder_repairs(image_tree, tmp_path, capsys):
    out = tmp_path / "folder"
    args = ["shards", "from-folder", str(image_tree[0]), "--out", str(out), "--max-count", "6", "--quiet"]
    cli(args)
    _assert_every_cut_fails(out, "train-000002.tar", "re-run the same `kdscale shards from-folder`", capsys)
    pristine = (out / "train-000000.tar").read_bytes()
    (out / "train-000000.tar").write_bytes(pristine[:1024])
    cli(args)  # the advertised fix: the resumable conversion rewrites the cut shard (new pax mtimes)
    assert os.path.getsize(out / "train-000000.tar") == len(pristine)
    cli(["shards", "verify", str(out / "*.tar"), "--workers", "1", "--quiet"])
    assert "0 problem(s)" in capsys.readouterr().out


def test_verify_reads_index_files_without_records(tmp_path, capsys):
    """A synthetic set written before index.json held records still verifies, and a cut
    shard still fails on its tar layout."""
    from kdscale.data.synth import write_synthetic_shards

    out = tmp_path / "old"
    write_synthetic_shards(str(out), num_classes=3, train_samples=8, val_samples=4, image_size=16,
                           samples_per_shard=4, progress=False)
    index = json.load(open(out / "index.json"))
    for split in index["splits"].values():
        del split["records"]
    (out / "index.json").write_text(json.dumps(index))
    cli(["shards", "verify", str(out / "*.tar"), "--workers", "1", "--quiet"])
    assert "0 problem(s)" in capsys.readouterr().out
    data = (out / "val-000000.tar").read_bytes()
    (out / "val-000000.tar").write_bytes(data[:_cut_points(out / "val-000000.tar")["before marker"]])
    _verify(str(out / "*.tar"))
    assert "val-000000.tar: incomplete tar: ends at byte" in capsys.readouterr().out
