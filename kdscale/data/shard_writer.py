"""The shard writer of every importer (``from-folder``, ``from-torchvision``, ``from-hf``):
items to webdataset tar shards, in parallel, resumable, with a JSON index.

Layout written: ``<out>/<split>-NNNNNN.tar`` holding ``<key>.<ext>`` (the original image
bytes, not re-encoded) and ``<key>.cls`` (the class index), and ``<out>/index.json`` with
the class names, and per split the sample count, shard list, per-shard records
(samples, bytes, sha256; see :mod:`kdscale.data.shards`) and ``labelled``.

An unlabelled split (``from-folder --unlabelled``, ``from-hf`` without a label column) has
items whose ``label`` is None: its samples carry no ``.cls`` member, the split records
``"labelled": false``, and the index keeps the class list of the labelled splits beside it
(none when there are none: ``classes`` empty, ``num_classes`` 0). Index files without the
key (older ones, ``synth``) are labelled.

Shards are planned up front (sorted input, at most ``max_count`` samples and
``max_bytes`` bytes each), each is written to ``.tmp`` and renamed when complete, and a
rerun skips the shards already done, so an interrupted conversion resumes.

Items hold an image file, encoded bytes, or a row for a picklable reader; their labels are
indices into the class list of the ``index.json`` already in ``out`` (:func:`align_classes`),
so every split of one output agrees on indices.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from kdscale.data.shards import INDEX_FILE, shard_record
from kdscale.errors import KdscaleError
from kdscale.progress import progress_bar

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


@dataclass
class Item:
    """One sample. ``path`` is the image file, or for importers the source it came from;
    ``data`` (with ``ext``) holds encoded bytes already in memory, and ``row`` is the row
    within ``path`` for readers of table files (``import_hf``). ``size`` plans shards."""

    path: str
    label: int | None
    """The class index; None for an unlabelled sample (no ``.cls`` member)."""
    key: str
    size: int
    data: bytes | None = None
    ext: str | None = None
    row: int = -1


def align_classes(items: list[Item], classes: list[str], known: list[str] | None,
                  source: str) -> tuple[list[Item], list[str]]:
    """Relabel ``items`` (indices into ``classes``) to the class list ``known`` already in
    the output's index.json (e.g. the train split's), so every split agrees on indices."""
    if not known or not classes or classes == known:
        return items, classes or (known or [])
    lookup = {name: i for i, name in enumerate(known)}
    unknown = [name for name in classes if name not in lookup]
    if unknown:
        raise KdscaleError(f"{source}: class(es) {', '.join(unknown[:3])} are not among the {len(known)} classes of "
                           f"the index.json in --out; convert the splits of one dataset into one --out")
    for item in items:
        item.label = lookup[classes[item.label]]
    return items, known


def existing_classes(out: str) -> list[str] | None:
    """The class names of the index.json already in ``out``, if any."""
    path = os.path.join(out, INDEX_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh).get("classes") or None


def plan_shards(items: list[Item], max_count: int, max_bytes: int) -> list[list[Item]]:
    seen: dict[str, str] = {}
    for item in items:
        if item.key in seen:
            raise KdscaleError(f"{item.path} and {seen[item.key]} map to the same sample key {item.key!r}; rename one")
        seen[item.key] = item.path
    shards, current, size = [], [], 0
    for item in items:
        if current and (len(current) >= max_count or size + item.size > max_bytes):
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item.size
    if current:
        shards.append(current)
    return shards


def read_images(items: list[Item]):
    """(extension, bytes) of each item: its in-memory ``data``, else its image file."""
    for item in items:
        if item.data is not None:
            yield item.ext, item.data
        else:
            with open(item.path, "rb") as fh:
                yield IMAGE_SUFFIXES[os.path.splitext(item.path)[1].lower()], fh.read()


def write_shard(path: str, items: list[Item], reader=read_images) -> dict:
    """``reader(items)`` yields each item's (extension, image bytes); it must pickle
    (it runs in the writer processes)."""
    import webdataset as wds

    tmp = path + ".tmp"
    with wds.TarWriter(tmp) as sink:
        for item, (ext, data) in zip(items, reader(items), strict=True):
            sample = {"__key__": item.key, ext: data}
            if item.label is not None:
                sample["cls"] = str(item.label)
            sink.write(sample)
    record = shard_record(tmp, len(items)) | {"name": os.path.basename(path)}
    with open(path + ".json.tmp", "w") as fh:
        json.dump(record, fh)
    os.replace(tmp, path)
    os.replace(path + ".json.tmp", path + ".json")  # the shard is done once its record exists
    return record


def write_folder_shards(items: list[Item], classes: list[str], out: str, split: str, max_count: int = 1000,
                        max_bytes: int = 1 << 30, workers: int = 2, progress: bool = True, reader=read_images,
                        generator: str = "kdscale from-folder", extra: dict | None = None) -> dict:
    os.makedirs(out, exist_ok=True)
    plan = plan_shards(items, max_count, max_bytes)
    paths = [os.path.join(out, f"{split}-{i:06d}.tar") for i in range(len(plan))]
    index_path = os.path.join(out, INDEX_FILE)
    index = json.load(open(index_path)) if os.path.isfile(index_path) else {"splits": {}}
    finished = {r["name"]: r for r in index["splits"].get(split, {}).get("records", [])}
    records: dict[str, dict] = {}
    todo = []
    for path, shard_items in zip(paths, plan):
        record = finished.get(os.path.basename(path))
        if os.path.isfile(path + ".json"):  # finished by an interrupted earlier run
            with open(path + ".json") as fh:
                record = json.load(fh)
        if (record and os.path.isfile(path) and record["samples"] == len(shard_items)
                and os.path.getsize(path) == record["bytes"]):
            records[path] = record
        else:
            todo.append((path, shard_items))
    bar = progress_bar(total=sum(len(i) for i in plan), initial=sum(r["samples"] for r in records.values()),
               desc=f"shards {split}", unit="img", disable=not progress)
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(write_shard, path, shard_items, reader): path for path, shard_items in todo}
        for future, path in futures.items():
            records[path] = future.result()
            bar.update(records[path]["samples"])
    bar.close()
    index["generator"] = generator
    index.update(extra or {})  # e.g. where an importer read the data from
    labelled = any(item.label is not None for item in items)
    if labelled:
        index["classes"] = classes
        index["num_classes"] = len(classes) if classes else max(i.label for i in items if i.label is not None) + 1
    else:  # the labelled splits beside it (if any) keep their class list
        index.setdefault("classes", [])
        index.setdefault("num_classes", 0)
    ordered = [records[p] for p in paths]
    index["splits"][split] = {"samples": sum(r["samples"] for r in ordered),
                              "shards": [r["name"] for r in ordered], "records": ordered,
                              "pattern": f"{split}-{{000000..{len(paths) - 1:06d}}}.tar", "labelled": labelled}
    with open(index_path + ".tmp", "w") as fh:
        json.dump(index, fh, indent=2)
    os.replace(index_path + ".tmp", index_path)
    for path in paths:
        if os.path.isfile(path + ".json"):
            os.remove(path + ".json")
    return index
