"""``kdscale shards from-hf``: a Hugging Face ``datasets`` image-classification set saved
on disk to tar shards with ``index.json`` (the layout of ``from-folder``, written by its
writer). The files are found and read by :mod:`kdscale.data.hf_files` (pyarrow alone: the
Hub's parquet layout or ``save_to_disk`` output).

Class names come from the label's ``ClassLabel`` feature in the schema's ``huggingface``
metadata (or ``dataset_info.json``); string labels become sorted class names. Without a
label column (no ``label`` and no ``ClassLabel`` column), or with ``unlabelled``, the
splits are written without labels (``"labelled": false`` in index.json). Split names map
to ``train``/``val`` (``validation``, ``valid``; ``test`` when there is no validation
split), other names are kept.
"""

from __future__ import annotations

import os

from kdscale.data.hf_files import (
    TableImages,
    column_of,
    features_of,
    find_splits,
    row_sizes,
    schema_of,
)
from kdscale.data.shard_writer import (
    Item,
    align_classes,
    existing_classes,
    write_folder_shards,
)
from kdscale.errors import KdscaleError

GENERATOR = "kdscale from-hf"
OUT_SPLITS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}


def pick_columns(file: str, features: dict, image: str | None, label: str | None,
                 unlabelled: bool = False) -> tuple[str, str | None]:
    """The image column and the label column; the label column is None (unlabelled data)
    with ``unlabelled``, or when none is named and the data has neither a ``label`` nor a
    ``ClassLabel`` column."""
    import pyarrow as pa

    schema = schema_of(file)
    names = schema.names

    def image_like(name: str) -> bool:
        kind = schema.field(name).type
        return ((features.get(name) or {}).get("_type") == "Image" or pa.types.is_binary(kind)
                or pa.types.is_large_binary(kind) or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0))

    def choose(given, default, candidates, what, option):
        if given is None:
            given = default if default in names else (candidates[0] if len(candidates) == 1 else None)
        if given not in names:
            which = f"column {given!r}" if given else f"{what} column found"
            raise KdscaleError(f"{file}: no {which} (columns: {', '.join(names)}); fix: pass {option} NAME")
        return given

    image = choose(image, "image", [n for n in names if image_like(n)], "image", "--image-column")
    if unlabelled:
        if label is not None:
            raise KdscaleError("--unlabelled writes no labels: drop --label-column, or drop --unlabelled")
        return image, None
    class_labels = [n for n in names if (features.get(n) or {}).get("_type") == "ClassLabel"]
    if label is None and "label" not in names and not class_labels:
        return image, None
    return image, choose(label, "label", class_labels, "label", "--label-column")


def output_splits(found: list[str], wanted: list[str] | None) -> dict[str, str]:
    """Dataset split -> output split (``NAME`` or ``NAME=OUT`` in ``wanted``)."""
    has_val = any(OUT_SPLITS.get(name.lower()) == "val" for name in found)
    default = {}
    for name in found:
        out = OUT_SPLITS.get(name.lower(), name)
        default[name] = "val" if out == "test" and not has_val else out
    if not wanted:
        mapping = default
    else:
        mapping = {}
        for entry in wanted:
            name, _, out = entry.partition("=")
            if name not in default:
                raise KdscaleError(f"split {name!r} not found; the dataset has: {', '.join(found)}")
            mapping[name] = out or default[name]
    outs = list(mapping.values())
    if len(set(outs)) != len(outs):
        raise KdscaleError(f"two splits would write the same output split ({mapping}); choose with "
                           f"--split NAME=OUT")
    return mapping


def import_hf(path: str, out: str, image_column: str | None = None, label_column: str | None = None,
              splits: list[str] | None = None, max_count: int = 1000, max_bytes: int = 1 << 30,
              workers: int = 2, progress: bool = True, log=print, unlabelled: bool = False) -> dict:
    """Write shards of a Hugging Face dataset on disk; returns the index. Without a label
    column (or with ``unlabelled``) every split is written without labels."""
    found = find_splits(path)
    mapping = output_splits(list(found), splits)
    first = found[next(iter(mapping))][0]
    features = features_of(first)
    image_column, label_column = pick_columns(first, features, image_column, label_column, unlabelled)
    if label_column is None and not unlabelled:
        columns = ", ".join(schema_of(first).names)
        log(f"{first}: no label column ('label' or a ClassLabel column; columns: {columns}): writing the splits "
            f"without labels (pass --label-column NAME if one holds them)")
    values, classes = _split_labels(found, mapping, features, label_column, first)
    base = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    index: dict = {}
    for name, out_split in mapping.items():
        if label_column is not None and any(v < 0 for v in values[name]):
            missing = sum(v < 0 for v in values[name])
            if splits:
                raise KdscaleError(f"split {name}: {missing} of {len(values[name])} rows have no label (-1 or "
                                   f"missing); it cannot be converted with labels (fix: --unlabelled writes it "
                                   f"without them)")
            log(f"skipping split {name}: {missing} of {len(values[name])} rows have no label (-1 or missing)")
            continue
        items, position = [], 0
        for file in found[name]:
            for row, size in enumerate(row_sizes(file, image_column)):
                label = values[name][position] if label_column is not None else None
                items.append(Item(file, label, f"{out_split}/{position:08d}", max(1, size), row=row))
                position += 1
        shard_classes = align_classes(items, classes, existing_classes(out), path)[1] if label_column else []
        index = write_folder_shards(items, shard_classes, out, out_split, max_count=max_count,
                                    max_bytes=max_bytes, workers=workers, progress=progress,
                                    reader=TableImages(image_column, base), generator=GENERATOR,
                                    extra={"source": {"huggingface": os.path.abspath(path), "image_column":
                                                      image_column, "label_column": label_column}})
        log(f"{name} -> {out_split}: {index['splits'][out_split]['samples']} samples"
            f"{'' if label_column else ' (unlabelled)'}")
    if not index:
        raise KdscaleError(f"{path}: no labelled split to convert (fix: --unlabelled writes them without labels)")
    return index


def _split_labels(found: dict[str, list[str]], mapping: dict[str, str], features: dict, label_column: str | None,
                  first: str) -> tuple[dict[str, list[int]], list[str]]:
    """Each split's labels as class indices (-1: none) and the class names; nothing without
    a label column."""
    import pyarrow as pa

    if label_column is None:
        return {name: [] for name in mapping}, []
    labels: dict[str, list] = {}
    for name in mapping:
        labels[name] = []
        for file in found[name]:
            if label_column not in schema_of(file).names:
                raise KdscaleError(f"{file}: no column {label_column!r}; fix: pass --label-column NAME")
            labels[name].extend(column_of(file, label_column).to_pylist())
    label_type = schema_of(first).field(label_column).type
    classes = list((features.get(label_column) or {}).get("names") or [])
    if not classes and (pa.types.is_string(label_type) or pa.types.is_large_string(label_type)):
        classes = sorted({v for values in labels.values() for v in values if v is not None})
    elif not classes:
        top = max((v for values in labels.values() for v in values if v is not None), default=-1)
        classes = [str(i) for i in range(top + 1)]
    lookup = {name: i for i, name in enumerate(classes)}
    return {name: [lookup.get(v, -1) if isinstance(v, str) else (-1 if v is None else int(v)) for v in values]
            for name, values in labels.items()}, classes
