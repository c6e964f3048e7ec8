"""Read a wandb run file (``run-<id>.wandb``) without a wandb server.

wandb 0.31 writes its records in a LevelDB-log-style file: a 7-byte header (``:W&B``, the
magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header (CRC32,
little-endian length, type: full/first/middle/last) and a piece of a serialized
``wandb_internal_pb2.Record``. This reads the run's metadata (id, group, job type, tags,
config) and its history rows, which is what ``kdscale compare`` and the tests need.

A session killed before wandb flushed anything leaves a file of just the header (or
less); it reads as a session with no records. Its run id is taken from the file name
(``run-<id>.wandb``), so it is grouped with the other sessions of its run instead of
showing up as a run of its own with no id.
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
    if len(data) < len(HEADER) and HEADER.startswith(data):
        return  # killed before the header was complete: no records
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


def session_run_id(path: str) -> str | None:
    """The run id in a session file's name, ``run-<id>.wandb``."""
    name = os.path.basename(path)
    return (name[4:-6] or None) if name.startswith("run-") and name.endswith(".wandb") else None


def session_run_dir(path: str) -> str | None:
    """The kdscale run dir of a session file (``<run dir>/wandb/offline-run-*/run-<id>.wandb``:
    the trainer starts wandb with ``dir=<run dir>``), or None for files elsewhere."""
    wandb_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return os.path.dirname(wandb_dir) if os.path.basename(wandb_dir) == "wandb" else None


def read_run_file(path: str) -> dict:
    """{"id", "group", "job_type", "tags", "config", "history": [row, ...], "summary"} of one
    file (``summary``: the run summary's updates in this session, later ones winning)."""
    from wandb.proto import wandb_internal_pb2 as pb

    run = {"id": session_run_id(path), "group": None, "job_type": None, "tags": [], "config": {}, "history": [],
           "summary": {}, "files": [path], "run_dir": session_run_dir(path)}
    for raw in iter_record_bytes(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id or run["id"], group=record.run.run_group or record.run.group,
                       job_type=record.run.job_type, tags=list(record.run.tags), name=record.run.display_name)
            for item in record.run.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            run["history"].append(row)
        elif kind == "summary":
            for item in record.summary.update:
                run["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return run


def offline_run_files(path: str) -> list[str]:
    """The run files under a kdscale run dir, a ``wandb`` dir or an ``offline-run-*`` dir,
    oldest first (a resumed run adds one ``offline-run-*`` directory per session)."""
    patterns = [os.path.join(path, "run-*.wandb"), os.path.join(path, "offline-run-*", "run-*.wandb"),
                os.path.join(path, "wandb", "offline-run-*", "run-*.wandb")]
    files = sorted({f for pattern in patterns for f in glob.glob(pattern)})
    return sorted(files, key=lambda f: os.path.basename(os.path.dirname(f)))


METADATA = ("group", "job_type", "tags", "config", "name", "run_dir")


def read_runs(path: str) -> list[dict]:
    """Runs found under ``path``; sessions of the same run id (resumed runs) are merged.

    ``files`` lists the sessions holding history, oldest first; sessions without a
    single history record (a killed session, often a 7-byte file) are listed in
    ``empty_files`` and add nothing. A run whose sessions are all empty is still
    returned, with an empty history, so the caller can say so or fill it from
    ``metrics.jsonl``. Metadata comes from the first session that has it; ``summary``
    merges the sessions' summary updates, the latest winning.
    """
    merged: dict[str, dict] = {}
    for file in offline_run_files(path):
        session = read_run_file(file)
        run = merged.setdefault(session["id"], {"id": session["id"], "history": [], "files": [],
                                                "empty_files": []})
        for key in METADATA:
            if not run.get(key) and session.get(key):
                run[key] = session[key]
        run["summary"] = {**run.get("summary", {}), **session["summary"]}
        if session["history"]:
            run["history"] += session["history"]
            run["files"].append(file)
        else:
            run["empty_files"].append(file)
    for run in merged.values():
        run.setdefault("config", {})
        run.setdefault("summary", {})
        run.setdefault("tags", [])
        for key in METADATA:
            run.setdefault(key, None)
    return list(merged.values())
