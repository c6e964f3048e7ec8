"""``kdscale shards verify``: decode every sample of a shard set and report the corrupt,
unlabelled, mislabelled and duplicated ones by key and shard, plus checksum and count
mismatches against ``index.json``."""

from __future__ import annotations

import io
import json
import os
from concurrent.futures import ProcessPoolExecutor

from kdscale.data.folder_shards import _sha256
from kdscale.data.loader import DECODE_ERRORS, BadSample, parse_sample
from kdscale.data.shards import INDEX_FILE
from kdscale.progress import progress_bar


def verify_shard(path: str, num_classes: int) -> dict:
    from PIL import Image

    from kdscale.data.tar_reader import iter_samples

    problems, keys, samples = [], [], iter_samples(path)
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            break
        except (OSError, ValueError) as err:
            problems.append(f"{path}: unreadable tar data: {err}")
            break
        key = sample.get("__key__", "?")
        keys.append(key)
        try:
            _key, data, _label = parse_sample(sample, num_classes)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
        except BadSample as err:
            problems.append(f"{path}: {err}")
        except DECODE_ERRORS as err:
            problems.append(f"{path}: sample {key}: cannot decode the image ({type(err).__name__}: {err})")
    return {"path": path, "samples": len(keys), "keys": keys, "problems": problems, "sha256": _sha256(path)}


def verify_shards(paths: list[str], num_classes: int, workers: int = 2, progress: bool = True) -> list[str]:
    """All problems found, one line each (empty when the shard set is sound)."""
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(progress_bar(pool.map(verify_shard, paths, [num_classes] * len(paths)), total=len(paths),
                            desc="verify", unit="shard", disable=not progress))
    problems = [p for r in results for p in r["problems"]]
    owner: dict[str, str] = {}
    for result in results:
        for key in result["keys"]:
            if key in owner:
                problems.append(f"{result['path']}: sample {key} duplicates the one in {owner[key]}")
            owner[key] = result["path"]
    index_path = os.path.join(os.path.dirname(paths[0]), INDEX_FILE)
    if os.path.isfile(index_path):
        recorded = {r["name"]: r for split in json.load(open(index_path)).get("splits", {}).values()
                    for r in split.get("records", [])}
        for result in results:
            record = recorded.get(os.path.basename(result["path"]))
            if record is None:
                continue
            if record["sha256"] != result["sha256"]:
                problems.append(f"{result['path']}: checksum differs from {index_path} (changed or damaged)")
            if record["samples"] != result["samples"]:
                problems.append(f"{result['path']}: {result['samples']} samples, {index_path} records "
                                f"{record['samples']}")
    return problems
