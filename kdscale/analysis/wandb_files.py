"""Read a wandb run file (``run-<id>.wandb``) without a wandb server.

wandb 0.31 writes its records in a LevelDB-log-style file: a 7-byte header (``:W&B``, the
magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header (CRC32,
little-endian length, type: full/first/middle/last) and a piece of a serialized
``wandb_internal_pb2.Record``. This reads the run's metadata (id, group, job type, tags,
config) and its history rows, which is what ``kdscale compare`` and the tests need.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import zlib

BLOCK = 32768
HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_record_bytes(path: str):
    with open(path, "rb") as fh:
        data = fh.read()
    if not data.startswith(HEADER):
        raise ValueError(f"{path} is not a wandb run file (bad header)")
    pos, pending = len(HEADER), b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # block trailer padding
            pos += room
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += room
            continue
        chunk = data[pos + 7:pos + 7 + length]
        if len(chunk) < length:
            return  # the writer was cut off: the last record is incomplete
        if zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{path}: checksum mismatch at byte {pos}")
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def read_run_file(path: str) -> dict:
    """{"id", "group", "job_type", "tags", "config", "history": [row, ...]} of one file."""
    from wandb.proto import wandb_internal_pb2 as pb

    run = {"id": None, "group": None, "job_type": None, "tags": [], "config": {}, "history": [], "files": [path]}
    for raw in iter_record_bytes(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, group=record.run.run_group or record.run.group,
                       job_type=record.run.job_type, tags=list(record.run.tags), name=record.run.display_name)
            for item in record.run.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            run["history"].append(row)
    return run


def offline_run_files(path: str) -> list[str]:
    """The run files under a kdscale run dir, a ``wandb`` dir or an ``offline-run-*`` dir,
    oldest first (a resumed run adds one ``offline-run-*`` directory per session)."""
    patterns = [os.path.join(path, "run-*.wandb"), os.path.join(path, "offline-run-*", "run-*.wandb"),
                os.path.join(path, "wandb", "offline-run-*", "run-*.wandb")]
    files = sorted({f for pattern in patterns for f in glob.glob(pattern)})
    return sorted(files, key=lambda f: os.path.basename(os.path.dirname(f)))


def read_runs(path: str) -> list[dict]:
    """Runs found under ``path``; files of the same run id (resumed sessions) are merged."""
    merged: dict[str, dict] = {}
    for file in offline_run_files(path):
        run = read_run_file(file)
        if run["id"] in merged:
            merged[run["id"]]["history"] += run["history"]
            merged[run["id"]]["files"] += run["files"]
        else:
            merged[run["id"]] = run
    return list(merged.values())
