"""A fast reader of webdataset tar shards.

Python's ``tarfile`` spends ~100 us per member building ``TarInfo`` objects, which
dominates the loader for small images. This reader parses the 512-byte ustar headers
directly (plus GNU long names and pax ``path`` records), streams from anything
webdataset's ``gopen`` can open (local files, ``pipe:``, http, s3 through a pipe), and
groups members into samples by key the way webdataset does: the key is the member path
up to the first dot of its file name, the rest is the field name.

The streaming reader stops quietly at a zero block or a clean end of file, as tar
readers do, so a shard cut exactly at a member boundary reads as a shorter, valid one.
:func:`tar_layout_problem` is the strict check ``kdscale shards verify`` uses instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator


class TruncatedShard(IOError):
    """The shard ends in the middle of a member."""


def _field(header: bytes, start: int, end: int) -> bytes:
    return header[start:end].split(b"\0", 1)[0]


def _size(header: bytes) -> int:
    raw = header[124:136]
    if raw[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(raw[1:], "big")
    text = _field(header, 124, 136).strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header. Records are ``"<length> <key>=<value>\\n"``
    with the length in bytes, record included, so a value may hold newlines or ``" path="``."""
    path, pos = None, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space <= pos or not data[pos:space].isdigit() or int(data[pos:space]) <= space - pos:
            break  # padding or a malformed record: nothing further can be read
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "replace")
        pos += length
    return path


def iter_members(stream, url: str, read=None) -> Iterator[tuple[str, bytes | None]]:
    """(path, bytes) of the regular files in a tar stream. With ``read`` (a predicate on the
    path), a member it declines comes as (path, None), its data skipped with a seek."""
    long_name = None
    while True:
        header = stream.read(512)
        if len(header) < 512:
            if header.strip(b"\0"):
                raise TruncatedShard(f"{url}: truncated inside a tar header")
            return
        if header == bytes(512):
            return
        size = _size(header)
        kind = header[156:157]
        name = None
        if kind in (b"0", b"\0", b"7"):
            if long_name is not None:
                name, long_name = long_name, None
            else:
                name = _field(header, 0, 100).decode()
                prefix = _field(header, 345, 500).decode()
                if prefix:
                    name = f"{prefix}/{name}"
        padding = (-size) % 512
        if name is not None and read is not None and not read(name):
            stream.seek(size + padding, os.SEEK_CUR)
            yield name, None
            continue
        data = stream.read(size)
        if len(data) < size:
            raise TruncatedShard(f"{url}: truncated inside a member ({len(data)} of {size} bytes)")
        if padding:
            stream.read(padding)
        if kind == b"L":  # GNU long name for the next member
            long_name = data.split(b"\0", 1)[0].decode()
        elif kind == b"x":  # pax header: take the path record if any
            long_name = _pax_path(data) or long_name
        elif name is None:
            long_name = None
        else:
            yield name, data


def _split_key(path: str) -> tuple[str, str]:
    slash = path.rfind("/") + 1
    dot = path.find(".", slash)
    if dot < 0:
        return path, ""
    return path[:dot], path[dot + 1:]


def iter_samples(url: str, fields: set[str] | None = None) -> Iterator[dict]:
    """Samples (dicts of field -> bytes, plus ``__key__`` and ``__url__``) of one shard. With
    ``fields`` (of a local, seekable shard) only those fields are read; the other members are
    skipped with seeks, and every sample is still yielded, in order."""
    from webdataset.gopen import gopen

    stream = gopen(url, "rb")
    read = None if fields is None else (lambda path: _split_key(path)[1].lower() in fields)
    try:
        current: dict | None = None
        for path, data in iter_members(stream, url, read):
            key, field = _split_key(path)
            if not field or key.startswith("__") and "/" not in key:
                continue  # metadata members (e.g. __index__) carry no sample
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            if data is not None:
                current[field.lower()] = data
        if current is not None:
            yield current
    finally:
        stream.close()


def _header_checksum_ok(header: bytes) -> bool:
    """ustar checksum: the byte sum of the header with its checksum field read as spaces
    (unsigned per POSIX; some old writers summed signed bytes, so either is accepted)."""
    text = _field(header, 148, 156).strip(b" \0")
    try:
        recorded = int(text, 8)
    except ValueError:
        return False
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    signed = unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b >= 128)
    return recorded in (unsigned, signed)


def tar_layout_problem(path: str) -> str | None:
    """Why the local tar file ``path`` is not a complete archive, or None if it is.

    Walks the headers only (member data is skipped with seeks, so it costs one header
    read per member) and requires what every tar writer produces: whole 512-byte
    headers with valid checksums, member data and padding inside the file, and the
    end-of-archive marker (two zero blocks). That catches a cut at any byte offset up to
    the end of the marker. Past the marker, writers pad to a record size (10 KiB for
    Python's ``tarfile``); a cut there is caught only if it leaves a partial block, and
    otherwise loses no data (the size and checksum in ``index.json`` still catch it).
    """
    end = os.path.getsize(path)
    with open(path, "rb") as fh:
        pos = 0
        while True:
            fh.seek(pos)
            header = fh.read(512)
            if not header and pos == 0:
                return "the file is empty: it was cut short or never written"
            if not header:
                return (f"ends at byte {pos}, after the last member, without the end-of-archive marker "
                        f"(two 512-byte zero blocks): the file was cut short")
            if header == bytes(len(header)):  # the end-of-archive marker, or what is left of it
                rest = fh.read(512)
                if rest.strip(b"\0"):
                    return (f"a zero block at byte {pos} is followed by more data: a damaged header or an "
                            f"incomplete end-of-archive marker (readers stop there and drop the rest)")
                if len(header) + len(rest) < 1024:
                    return (f"ends at byte {end}, inside the end-of-archive marker that starts at byte {pos}: "
                            f"the file was cut short")
                if end % 512:
                    return f"ends at byte {end}, inside a block after the end-of-archive marker: the file was cut short"
                return None
            if len(header) < 512:
                return f"ends at byte {end}, inside the tar header that starts at byte {pos}: the file was cut short"
            if not _header_checksum_ok(header):
                return f"the tar header at byte {pos} has a bad checksum: the file is damaged or cut and rejoined"
            size = _size(header)
            name = _field(header, 0, 100).decode("utf-8", "replace")
            data_end = pos + 512 + size
            if data_end > end:
                return (f"member {name} (header at byte {pos}) runs past the end of the file: it needs {size} "
                        f"bytes of data, {max(0, end - pos - 512)} are there; the file was cut short")
            pos = data_end + (-size) % 512
            if pos > end:
                return f"ends at byte {end}, inside the padding of member {name}: the file was cut short"
