"""``kdscale shards from-folder``: the items of an ImageNet-style class-folder tree, of a
file list with labels, or of a flat folder with a label file (ImageNet's val set, see
:mod:`kdscale.data.imagenet_labels`), for :func:`kdscale.data.shard_writer.write_folder_shards`.

Keys are ``<class folder>/<file stem>`` (dots replaced), stable across runs, which is
what teacher-output shards are keyed by. With ``--unlabelled`` every image under the folder
(any depth, any layout) is an item without a label, keyed by its path below the folder
without the extension.
"""

from __future__ import annotations

import os
import re

from kdscale.data.imagenet_labels import val_label_rows
from kdscale.data.shard_writer import (
    IMAGE_SUFFIXES,
    Item,
    align_classes,
    existing_classes,
)
from kdscale.errors import KdscaleError


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


def unlabelled_items(src: str) -> list[Item]:
    """Every image under ``src`` (recursively), without labels, in sorted path order."""
    if not os.path.isdir(src):
        raise KdscaleError(f"source folder not found: {src}")
    items = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for file in sorted(files):
            if os.path.splitext(file)[1].lower() in IMAGE_SUFFIXES:
                path = os.path.join(root, file)
                items.append(Item(path, None, _key(os.path.relpath(path, src)), os.path.getsize(path)))
    return items


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


def collect_items(src: str | None, file_list: str | None, labels: str | None,
                  out: str, unlabelled: bool = False) -> tuple[list[Item], list[str]]:
    """The items of a ``from-folder`` command: a class-folder tree, a file list, or a flat
    folder with a label file (ImageNet's val set, see :func:`imagenet_labels.val_label_rows`),
    or with ``unlabelled`` every image under ``src`` without labels (no classes).
    Labels are indices into the classes of the index.json already in ``out`` when there is
    one (the split written first), so a split lacking some classes keeps the same indices."""
    known = existing_classes(out)
    if unlabelled:
        if labels or file_list or not src:
            raise KdscaleError("--unlabelled takes the images' folder (positional SRC) alone, without "
                               "--labels or --file-list")
        items, classes = unlabelled_items(src), []
    elif labels:
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
