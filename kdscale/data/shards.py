"""Shard lists: expand a brace pattern or glob into tar files, with clear errors; and the
per-shard records of ``index.json``.

Every ``index.json`` kdscale writes (``shards synth`` and ``shards from-folder``) lists,
per split, ``records``: one ``{"name", "samples", "bytes", "sha256"}`` per shard. The
byte size makes a truncated shard obvious without reading it; the sha256 catches damage
that keeps the size. Older index files may lack ``records`` (synthetic sets) or single
fields; readers here treat a missing field as "not recorded", never as a mismatch.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

from braceexpand import braceexpand

from kdscale.errors import KdscaleError

INDEX_FILE = "index.json"


def expand_shards(pattern: str, key: str) -> list[str]:
    """All shard paths named by ``pattern`` (brace ranges and globs), which must exist.

    Remote URLs (``pipe:``, ``s3://``...) are passed through unchecked.
    """
    if not pattern:
        raise KdscaleError(f"{key} is empty: set it to the tar shards, e.g. data/train-{{000000..000099}}.tar")
    paths: list[str] = []
    for item in braceexpand(pattern):
        if "://" in item or item.startswith("pipe:"):
            paths.append(item)
        elif any(ch in item for ch in "*?["):
            paths.extend(sorted(glob.glob(item)))
        else:
            paths.append(item)
    local_missing = [p for p in paths if "://" not in p and not p.startswith("pipe:") and not os.path.isfile(p)]
    if not paths or len(local_missing) == len(paths):
        raise KdscaleError(f"{key}={pattern!r} matches no file; check the path (it is relative to "
                           f"{os.getcwd()}) or generate data with `kdscale shards synth`")
    if local_missing:
        more = f" (+{len(local_missing) - 3} more)" if len(local_missing) > 3 else ""
        raise KdscaleError(f"{key}: {len(local_missing)} of {len(paths)} shards are missing, e.g. "
                           f"{', '.join(local_missing[:3])}{more}")
    return paths


def samples_from_index(shards: list[str], split: str) -> int | None:
    """The sample count recorded in ``index.json`` beside the shards, if there is one."""
    index_path = os.path.join(os.path.dirname(shards[0]), INDEX_FILE)
    if not os.path.isfile(index_path):
        return None
    with open(index_path) as fh:
        index = json.load(fh)
    entry = index.get("splits", {}).get(split)
    if not entry:
        return None
    names = {os.path.basename(s) for s in shards}
    if names != set(entry["shards"]):
        return None  # a subset or another set of shards: the recorded count does not apply
    return int(entry["samples"])


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_record(path: str, samples: int) -> dict:
    """The ``index.json`` record of a finished shard file."""
    return {"name": os.path.basename(path), "samples": samples, "bytes": os.path.getsize(path),
            "sha256": file_sha256(path)}


def read_index(index_path: str) -> dict:
    with open(index_path) as fh:
        return json.load(fh)


def index_records(index: dict) -> dict[str, dict]:
    """Shard name -> its record, over all splits (empty for index files without records)."""
    return {r["name"]: r for split in index.get("splits", {}).values() for r in split.get("records", [])
            if isinstance(r, dict) and "name" in r}


def unlabelled_splits(index: dict, shard_names) -> list[str]:
    """The splits of ``index`` recorded as unlabelled (``"labelled": false``) that hold any of
    ``shard_names`` (file names); a split without the key (older files) is labelled."""
    names = set(shard_names)
    return [name for name, entry in index.get("splits", {}).items()
            if entry.get("labelled") is False and names & set(entry.get("shards", []))]


def recorded_unlabelled(shards: list[str]) -> list[str]:
    """The splits that ``index.json`` beside local ``shards`` records as unlabelled and that hold
    any of them (:func:`unlabelled_splits`); none for remote shards or without an index."""
    index_path = os.path.join(os.path.dirname(shards[0]), INDEX_FILE)
    if "://" in shards[0] or shards[0].startswith("pipe:") or not os.path.isfile(index_path):
        return []
    with open(index_path) as fh:
        return unlabelled_splits(json.load(fh), [os.path.basename(s) for s in shards])


def rewrite_hint(index: dict | None) -> str:
    """How to get a sound copy of a damaged shard, for the generator that wrote ``index``.

    from-folder (and the importers, which share its writer) only rewrites shards whose
    size or sample count differs from their record, so a shard damaged in place must be
    deleted first: the hint always says so.
    """
    generator = (index or {}).get("generator", "")
    if generator == "kdscale synth":
        return ("fix: re-write the set with the same `kdscale shards synth` arguments "
                "(the same seed gives the same samples)")
    if generator.startswith("kdscale from-") or (index or {}).get("classes") is not None:
        tool = generator.split()[-1] if generator.startswith("kdscale from-") else "from-folder"
        return (f"fix: delete the shard and re-run the same `kdscale shards {tool}` command (it is resumable: "
                "it writes only the missing shards)")
    return "fix: re-write the shard from its source"
