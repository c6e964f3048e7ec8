"""``kdscale shards verify``: decode every sample of a shard set and report the corrupt,
unlabelled, mislabelled and duplicated ones by key and shard, plus truncated shards and
size, checksum and count mismatches against ``index.json``.

Truncation is checked twice, so a shard cut at any byte offset fails:

- independent of ``index.json``, the tar layout must be complete
  (:func:`kdscale.data.tar_reader.tar_layout_problem`): no member running past the end of
  the file and the end-of-archive marker present. The sample decoder alone misses a cut
  at a member boundary, because a tar stream that stops there reads as a shorter archive;
- with an ``index.json`` record for the shard, its byte size and sha256 must match.

Each problem line starts with the shard's path; lines about a damaged shard end with the
fix for the tool that wrote the set (see :func:`kdscale.data.shards.rewrite_hint`).
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor

from kdscale.data.loader import DECODE_ERRORS, BadSample, parse_sample
from kdscale.data.shards import (
    INDEX_FILE,
    file_sha256,
    index_records,
    read_index,
    rewrite_hint,
    unlabelled_splits,
)
from kdscale.progress import progress_bar


def verify_shard(path: str, num_classes: int, labels_required: bool = True) -> dict:
    """Decode one local shard: its problems (damage lines have no fix yet), keys, sizes.
    ``labels_required``: False for a shard of a split ``index.json`` records as unlabelled
    (a sample without ``.cls`` is then sound)."""
    from PIL import Image

    from kdscale.data.tar_reader import iter_samples, tar_layout_problem

    layout = tar_layout_problem(path)
    problems, keys, samples = [], [], iter_samples(path)
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            break
        except (OSError, ValueError) as err:
            if layout is None:  # otherwise the layout message says the same, more precisely
                problems.append(f"{path}: unreadable tar data: {err}")
            break
        key = sample.get("__key__", "?")
        keys.append(key)
        try:
            _key, data, _label = parse_sample(sample, num_classes, labels_required=labels_required)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
        except BadSample as err:
            problems.append(f"{path}: {err}")
        except DECODE_ERRORS as err:
            problems.append(f"{path}: sample {key}: cannot decode the image ({type(err).__name__}: {err})")
    return {"path": path, "samples": len(keys), "keys": keys, "problems": problems, "layout": layout,
            "bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def _index_beside(path: str, cache: dict) -> tuple[str, dict | None]:
    index_path = os.path.join(os.path.dirname(path), INDEX_FILE)
    if index_path not in cache:
        cache[index_path] = read_index(index_path) if os.path.isfile(index_path) else None
    return index_path, cache[index_path]


def _labels_required(path: str, indexes: dict) -> bool:
    """Whether the shard's samples need a ``.cls``: not where ``index.json`` records its split as unlabelled."""
    index = _index_beside(path, indexes)[1]
    return not index or not unlabelled_splits(index, [os.path.basename(path)])


def index_problems(result: dict, index_path: str, record: dict) -> list[str]:
    """Mismatches of one verified shard against its ``index.json`` record (fields the
    record lacks, as in older index files, are not checked)."""
    path, out = result["path"], []
    size_differs = "bytes" in record and record["bytes"] != result["bytes"]
    if size_differs:
        state = "truncated" if result["bytes"] < record["bytes"] else "changed"
        out.append(f"{path}: {result['bytes']} bytes, {index_path} records {record['bytes']} ({state})")
    elif "sha256" in record and record["sha256"] != result["sha256"]:  # implied when the size differs
        out.append(f"{path}: checksum differs from {index_path} (changed or damaged)")
    if "samples" in record and record["samples"] != result["samples"]:
        out.append(f"{path}: {result['samples']} samples, {index_path} records {record['samples']}")
    return out


def verify_shards(paths: list[str], num_classes: int, workers: int = 2, progress: bool = True) -> list[str]:
    """All problems found, one line each (empty when the shard set is sound).

    With ``workers <= 1`` the shards are verified in this process (no pool to start).
    """
    indexes: dict[str, dict | None] = {}
    required = [_labels_required(p, indexes) for p in paths]
    if workers <= 1:
        results = [verify_shard(p, num_classes, r) for p, r in progress_bar(zip(paths, required), total=len(paths),
                                                                            desc="verify", unit="shard",
                                                                            disable=not progress)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(progress_bar(pool.map(verify_shard, paths, [num_classes] * len(paths), required),
                                        total=len(paths), desc="verify", unit="shard", disable=not progress))
    problems = [p for r in results for p in r["problems"]]
    owner: dict[str, str] = {}
    for result in results:
        for key in result["keys"]:
            if key in owner:
                problems.append(f"{result['path']}: sample {key} duplicates the one in {owner[key]}")
            owner[key] = result["path"]
    for result in results:
        index_path, index = _index_beside(result["path"], indexes)
        fix = rewrite_hint(index)
        damage = []
        if result["layout"]:
            damage.append(f"{result['path']}: incomplete tar: {result['layout']}")
        record = index_records(index).get(os.path.basename(result["path"])) if index else None
        if record is not None:
            damage += index_problems(result, index_path, record)
        problems += [f"{line}; {fix}" for line in damage]
    return problems
