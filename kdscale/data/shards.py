"""Shard lists: expand a brace pattern or glob into tar files, with clear errors."""

from __future__ import annotations

import glob
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
