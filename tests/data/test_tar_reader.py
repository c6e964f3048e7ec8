"""kdscale's fast tar reader against Python's ``tarfile``: the same regular members, names
and bytes, in the same order, for USTAR, GNU (long-name records) and PAX (long and
non-ASCII names) archives; and a shard cut at any byte either reads as a shorter valid
archive (cut at a member boundary, as tar readers do) or raises ``TruncatedShard``."""

from __future__ import annotations

import io
import tarfile

import pytest

from kdscale.data.tar_reader import (
    TruncatedShard,
    iter_members,
    iter_samples,
    tar_layout_problem,
)

LONG_DIR = "a-directory-name-long-enough/" * 4  # 116 characters
NON_ASCII = ["données/éléphant.jpg", "日本語/画像.cls", "ß" * 70 + ".txt"]  # the last: 141 bytes in UTF-8


def _payload(index: int, name: str) -> bytes:
    sizes = [0, 1, 511, 512, 513, 1500]  # empty, padded, exactly one block, one byte over
    return (f"{index}:{name}|".encode() * 400)[:sizes[index % len(sizes)]]


def _write(path, fmt: int, names: list[str], extras: bool = True) -> None:
    """Regular files ``names``, with a directory, a symlink and a hard link (all long-named
    where the format allows) in between: members the reader must skip without letting their
    long-name records leak into the next file."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            data = _payload(i, name)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
            if extras and i == 1:
                long = fmt != tarfile.USTAR_FORMAT
                for kind, link in ((tarfile.DIRTYPE, ""), (tarfile.SYMTYPE, names[0]), (tarfile.LNKTYPE, names[0])):
                    other = tarfile.TarInfo(("L" * 150 if long else "short") + f"-{kind.decode()}")
                    other.type, other.linkname = kind, link
                    tar.addfile(other)


def _tarfile_members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def _kdscale_members(path) -> list[tuple[str, bytes]]:
    with open(path, "rb") as stream:
        return list(iter_members(stream, str(path)))


FORMATS = {
    # ustar: names up to 100 bytes, or 255 split at a "/" into the prefix field
    "ustar": (tarfile.USTAR_FORMAT, ["plain.jpg", "sub/dir/sample.cls", LONG_DIR + "in-prefix.jpg",
                                     "données/éléphant.jpg", "x" * 100, "y" * 150 + "/" + "z" * 90]),
    # GNU: longer names go into a ././@LongLink record before the member
    "gnu": (tarfile.GNU_FORMAT, ["plain.jpg", LONG_DIR + "sample.jpg", "n" * 300 + ".cls", *NON_ASCII,
                                 "x" * 100, "x" * 101]),
    # PAX: long and non-ASCII names go into an extended header's path record
    "pax": (tarfile.PAX_FORMAT, ["plain.jpg", LONG_DIR + "sample.jpg", "n" * 300 + ".cls", *NON_ASCII,
                                 "x" * 100, "x" * 101, "new\nline" * 20 + ".txt", "name path=inside.txt" * 8]),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_reader_matches_tarfile(fmt, tmp_path):
    tar_format, names = FORMATS[fmt]
    path = tmp_path / f"{fmt}.tar"
    _write(path, tar_format, names)
    expected = _tarfile_members(path)
    assert [name for name, _ in expected] == names  # tarfile itself round-trips every name
    assert _kdscale_members(path) == expected
    assert tar_layout_problem(str(path)) is None


def test_pax_records_are_parsed_by_length(tmp_path):
    """A pax value may hold a newline or the text ' path=' (records are length-prefixed);
    other records (comments, mtimes) do not change the name."""
    path = tmp_path / "records.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, headers in (("plain.txt", {"comment": "17 path=evil.txt\n"}),
                              ("é.txt", {"comment": "x path=evil.txt", "mtime": "1.5"}),
                              ("a\nb" * 40 + ".txt", {})):
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = 3, headers
            tar.addfile(info, io.BytesIO(b"abc"))
    assert _kdscale_members(path) == _tarfile_members(path) == [
        ("plain.txt", b"abc"), ("é.txt", b"abc"), ("a\nb" * 40 + ".txt", b"abc")]


def test_samples_group_long_and_non_ascii_keys(tmp_path):
    names = []
    for key in (LONG_DIR + "k" * 80, "données/éléphant-0001", "plain"):
        names += [f"{key}.jpg", f"{key}.cls"]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"samples-{fmt}.tar"
        _write(path, fmt, names, extras=False)
        samples = list(iter_samples(str(path)))
        assert [s["__key__"] for s in samples] == [LONG_DIR + "k" * 80, "données/éléphant-0001", "plain"]
        assert all(set(s) == {"__key__", "__url__", "jpg", "cls"} for s in samples)
        assert samples[1]["jpg"] == _payload(2, names[2])


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_declined_members_are_skipped_by_seeks(fmt, tmp_path):
    """``read`` declines members: they come with no data, the others as tarfile reads them,
    with long names (GNU, pax) and the skipped link members in between intact."""
    tar_format, names = FORMATS[fmt]
    path = tmp_path / f"{fmt}.tar"
    _write(path, tar_format, names)
    with open(path, "rb") as stream:
        kept = list(iter_members(stream, str(path), read=lambda name: name.endswith(".cls")))
    assert kept == [(name, data if name.endswith(".cls") else None) for name, data in _tarfile_members(path)]


def test_samples_with_only_some_fields(tmp_path):
    names = []
    for key in (LONG_DIR + "k" * 80, "données/éléphant-0001", "no-label", "plain"):
        names += [f"{key}.jpg"] + ([f"{key}.cls"] if key != "no-label" else [])
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"fields-{fmt}.tar"
        _write(path, fmt, names, extras=False)
        full, labels = list(iter_samples(str(path))), list(iter_samples(str(path), fields={"cls"}))
        assert [s["__key__"] for s in labels] == [s["__key__"] for s in full]  # every sample, in order
        assert [s.get("cls") for s in labels] == [s.get("cls") for s in full] and "jpg" not in labels[0]


def _boundaries(data: bytes) -> tuple[list[tuple[int, int, int]], int]:
    """(header start, data start, data end) of every header block as laid out, and the
    offset of the end-of-archive marker."""
    blocks, pos = [], 0
    while data[pos:pos + 512] != bytes(512):
        size = tarfile.TarInfo.frombuf(data[pos:pos + 512], "utf-8", "surrogateescape").size
        blocks.append((pos, pos + 512, pos + 512 + size))
        pos += 512 + size + (-size) % 512
    return blocks, pos


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_truncated_shard_raises_or_reads_a_prefix(fmt, tmp_path):
    """Cut at every byte up to the end-of-archive marker: a cut inside a header or inside a
    member's data raises TruncatedShard naming the shard (after yielding the complete
    members before it); a cut at a block boundary or inside a member's padding yields the
    complete members before the cut, never a partial or wrong one. ``tar_layout_problem``
    (what ``kdscale shards verify`` runs) reports every cut."""
    tar_format, names = FORMATS[fmt]
    path = tmp_path / "whole.tar"
    _write(path, tar_format, names[:6])
    data = path.read_bytes()
    full = _tarfile_members(path)
    blocks, marker = _boundaries(data)
    inside = [(start, end) for start, _, end in blocks]  # header start .. data end, padding excluded
    cut_path = tmp_path / "cut.tar"
    raised = quiet = 0
    for cut in range(marker + 1):
        stream = io.BytesIO(data[:cut])
        got = []
        try:
            for member in iter_members(stream, "shard-000007.tar"):
                got.append(member)
        except TruncatedShard as err:
            raised += 1
            assert str(err).startswith("shard-000007.tar: truncated inside a ")
            assert any(start < cut < end for start, end in inside), cut
        else:
            quiet += 1
            assert not any(start < cut < end for start, end in inside), cut
        assert got == full[:len(got)], cut
        if cut % 97 == 0 or cut == marker:
            cut_path.write_bytes(data[:cut])
            assert tar_layout_problem(str(cut_path)) is not None, cut
    assert raised > marker // 2 and quiet >= len(full)


def test_truncated_shard_through_iter_samples(tmp_path):
    path = tmp_path / "shard.tar"
    _write(path, tarfile.PAX_FORMAT, [f"s{i:03d}.{field}" for i in range(4) for field in ("jpg", "cls")],
           extras=False)
    data = path.read_bytes()
    blocks, _ = _boundaries(data)
    path.write_bytes(data[:blocks[5][1] + 10])  # 10 bytes into s002.cls (1500 bytes)
    read = []
    with pytest.raises(TruncatedShard, match=rf"{path}: truncated inside a member \(10 of 1500 bytes\)"):
        for sample in iter_samples(str(path)):
            read.append(sample["__key__"])
    assert read == ["s000", "s001"]  # s002 is never yielded with a missing or partial field
