"""``kdscale shards from-folder``: an ImageNet-style class-folder tree (or a file list with
labels) to webdataset tar shards, in parallel, resumable, with a JSON index.

Layout written: ``<out>/<split>-NNNNNN.tar`` holding ``<key>.<ext>`` (the original image
bytes, not re-encoded) and ``<key>.cls`` (the class index), and ``<out>/index.json`` with
the class names, and per split the sample count, shard list and per-shard records
(samples, bytes, sha256; see :mod:`kdscale.data.shards`).
Keys are ``<class folder>/<file stem>`` (dots replaced), stable across runs, which is
what teacher-output shards are keyed by.

Shards are planned up front (sorted input, at most ``max_count`` samples and
``max_bytes`` bytes each), each is written to ``.tmp`` and renamed when complete, and a
rerun skips the shards already done, so an interrupted conversion resumes.

The dataset importers (``from-torchvision``, ``from-hf``) write through the same
:func:`write_folder_shards`, with items holding encoded bytes or a picklable reader.
"""

from __future__ import annotations

import json
import os
import re
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
    label: int
    key: str
    size: int
    data: bytes | None = None
    ext: str | None = None
    row: int = -1


def _key(relative: str) -> str:
    stem = os.path.splitext(relative)[0].replace(os.sep, "/")
    return re.sub(r"[^A-Za-z0-9_/-]", "_", stem)


def items_from_folder(src: str) -> tuple[list[Item], list[str]]:
    if not os.path.isdir(src):
        raise KdscaleError(f"source folder not found: {src}")
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    if not classes:
        raise KdscaleError(f"{src} has no class subfolders (expected {src}/<class>/<image>.jpg)")
    items = []
    for label, name in enumerate(classes):
        for root, _dirs, files in sorted(os.walk(os.path.join(src, name))):
            for file in sorted(files):
                if os.path.splitext(file)[1].lower() in IMAGE_SUFFIXES:
                    path = os.path.join(root, file)
                    items.append(Item(path, label, _key(os.path.relpath(path, src)), os.path.getsize(path)))
    return items, classes


def items_from_list(list_file: str, root: str | None, classes: list[str] | None = None) -> tuple[list[Item], list[str]]:
    """Lines ``<path> <label>``: label an integer index or a class name."""
    if not os.path.isfile(list_file):
        raise KdscaleError(f"file list not found: {list_file}")
    rows = []
    with open(list_file) as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise KdscaleError(f"{list_file}:{number}: expected '<path> <label>', got {line.strip()!r}")
            rows.append((parts[0], parts[1], f"{list_file}:{number}"))
    return items_from_rows(rows, root or os.path.dirname(os.path.abspath(list_file)), classes)


def items_from_rows(rows: list[tuple[str, str, str]], base: str,
                    classes: list[str] | None = None) -> tuple[list[Item], list[str]]:
    """Rows ``(path, label, where)``: paths relative to ``base``, label an index or a class
    name (an index into ``classes`` when given, else into the sorted names of the rows)."""
    names = classes if classes else sorted({label for _, label, _ in rows if not label.lstrip("-").isdigit()})
    lookup = {name: i for i, name in enumerate(names)}
    items = []
    for path, label, where in rows:
        full = path if os.path.isabs(path) else os.path.join(base, path)
        if not os.path.isfile(full):
            raise KdscaleError(f"{where}: image not found: {full}")
        if label.lstrip("-").isdigit():
            index = int(label)
        elif label in lookup:
            index = lookup[label]
        else:
            raise KdscaleError(f"{where}: class {label!r} is not one of the {len(names)} classes of the index "
                               f"(e.g. {', '.join(names[:3])}); write the train split first, into the same --out")
        items.append(Item(full, index, _key(os.path.relpath(full, base)), os.path.getsize(full)))
    return items, names


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


def collect_items(src: str | None, file_list: str | None, labels: str | None,
                  out: str) -> tuple[list[Item], list[str]]:
    """The items of a ``from-folder`` command: a class-folder tree, a file list, or a flat
    folder with a label file (ImageNet's val set, see :func:`import_torchvision.val_label_rows`).
    Labels are indices into the classes of the index.json already in ``out`` when there is
    one (the split written first), so a split lacking some classes keeps the same indices."""
    known = existing_classes(out)
    if labels:
        from kdscale.data.import_torchvision import val_label_rows

        if not src:
            raise KdscaleError("--labels needs the folder of the images (positional SRC)")
        items, classes = items_from_rows(val_label_rows(labels), src, known)
    elif file_list:
        items, classes = items_from_list(file_list, src, known)
    elif src:
        items, classes = align_classes(*items_from_folder(src), known, src)
    else:
        raise KdscaleError("give a class-folder tree (positional SRC), --file-list FILE, or SRC --labels FILE")
    if not items:
        raise KdscaleError(f"no images (.jpg/.jpeg/.png/.webp) found in {src or file_list}")
    return items, classes


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
            sink.write({"__key__": item.key, ext: data, "cls": str(item.label)})
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
    index["classes"] = classes
    index["num_classes"] = len(classes) if classes else max(i.label for i in items) + 1
    ordered = [records[p] for p in paths]
    index["splits"][split] = {"samples": sum(r["samples"] for r in ordered),
                              "shards": [r["name"] for r in ordered], "records": ordered,
                              "pattern": f"{split}-{{000000..{len(paths) - 1:06d}}}.tar"}
    with open(index_path + ".tmp", "w") as fh:
        json.dump(index, fh, indent=2)
    os.replace(index_path + ".tmp", index_path)
    for path in paths:
        if os.path.isfile(path + ".json"):
            os.remove(path + ".json")
    return index
