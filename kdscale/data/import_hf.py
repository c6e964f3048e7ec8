"""``kdscale shards from-hf``: a Hugging Face ``datasets`` image-classification set saved
on disk to tar shards with ``index.json`` (the layout of ``from-folder``, written by its
writer), read with pyarrow alone (the ``datasets`` package is not needed).

Two on-disk forms are read:

- the Hub's parquet layout: ``*.parquet`` anywhere under the folder, the split taken from
  the file name (``data/train-00000-of-00002.parquet``) or else its folder
  (``train/0000.parquet``, ``default/validation/0000.parquet``);
- ``save_to_disk`` output: ``state.json``, ``dataset_info.json`` and ``data-*.arrow``
  (Arrow IPC streams), one folder per split below a ``dataset_dict.json``.

The image column is an ``Image`` feature, a struct ``{bytes, path}`` (a ``path`` alone is
read relative to the dataset folder), or plain binary; its bytes are stored as they are
(JPEG, PNG, WebP; other formats are re-encoded as PNG). Class names come from the label's
``ClassLabel`` feature in the schema's ``huggingface`` metadata (or ``dataset_info.json``);
string labels become sorted class names. Split names map to ``train``/``val``
(``validation``, ``valid``; ``test`` when there is no validation split), other names are
kept. Images are read lazily by the writer processes, by parquet row group or from the
memory-mapped Arrow file, so a set larger than memory converts.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import re
from dataclasses import dataclass

from kdscale.data.shard_writer import (
    Item,
    align_classes,
    existing_classes,
    write_folder_shards,
)
from kdscale.errors import KdscaleError

GENERATOR = "kdscale from-hf"
OUT_SPLITS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}
MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"))


def _arrow_table(file: str):
    import pyarrow as pa

    source = pa.memory_map(file)
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(source).read_all()


def _schema(file: str):
    import pyarrow.parquet as pq

    return pq.read_schema(file) if file.endswith(".parquet") else _arrow_table(file).schema


def _column(file: str, column: str):
    import pyarrow.parquet as pq

    if file.endswith(".parquet"):
        return pq.read_table(file, columns=[column]).column(column)
    return _arrow_table(file).column(column)


def find_splits(path: str) -> dict[str, list[str]]:
    """Split name -> its data files (sorted), for a parquet tree or save_to_disk output."""
    if os.path.isfile(path) and path.endswith((".parquet", ".arrow")):
        return {_parquet_split(os.path.basename(path)): [os.path.abspath(path)]}
    if not os.path.isdir(path):
        raise KdscaleError(f"Hugging Face dataset folder not found: {path}")
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as fh:
            names = json.load(fh).get("splits", [])
        return {name: _state_files(os.path.join(path, name)) for name in names}
    if os.path.isfile(os.path.join(path, "state.json")):
        with open(os.path.join(path, "state.json")) as fh:
            name = json.load(fh).get("_split") or "train"
        return {name: _state_files(path)}
    splits: dict[str, list[str]] = {}
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file in sorted(files):
            if file.endswith(".parquet"):
                rel = os.path.relpath(os.path.join(root, file), path)
                splits.setdefault(_parquet_split(rel), []).append(os.path.join(root, file))
    if not splits:
        raise KdscaleError(f"{path}: no Hugging Face dataset found (no *.parquet files, no state.json or "
                           f"dataset_dict.json of save_to_disk); fix: point --path at the dataset's folder")
    return {name: sorted(files) for name, files in splits.items()}


def _parquet_split(rel: str) -> str:
    stem = os.path.splitext(os.path.basename(rel))[0]
    match = re.match(r"^(.+?)-\d+-of-\d+(?:-[0-9a-f]+)?$", stem)
    if match:
        return match.group(1)
    return os.path.basename(os.path.dirname(rel)) or "train"


def _state_files(folder: str) -> list[str]:
    state = os.path.join(folder, "state.json")
    if not os.path.isfile(state):
        raise KdscaleError(f"{folder}: no state.json (expected save_to_disk output: state.json, "
                           f"dataset_info.json, data-*.arrow)")
    with open(state) as fh:
        files = [os.path.join(folder, f["filename"]) for f in json.load(fh).get("_data_files", [])]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing or not files:
        raise KdscaleError(f"{folder}: state.json lists missing data files: {', '.join(missing) or 'none listed'}")
    return files


def features_of(file: str) -> dict:
    """The ``datasets`` features (JSON) of a data file: its schema's ``huggingface``
    metadata, else the ``dataset_info.json`` beside it."""
    meta = _schema(file).metadata or {}
    if b"huggingface" in meta:
        info = json.loads(meta[b"huggingface"])
        features = info.get("info", {}).get("features") or info.get("features")
        if features:
            return features
    info_path = os.path.join(os.path.dirname(file), "dataset_info.json")
    if os.path.isfile(info_path):
        with open(info_path) as fh:
            return json.load(fh).get("features") or {}
    return {}


def pick_columns(file: str, features: dict, image: str | None, label: str | None) -> tuple[str, str]:
    import pyarrow as pa

    schema = _schema(file)
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
    class_labels = [n for n in names if (features.get(n) or {}).get("_type") == "ClassLabel"]
    return image, choose(label, "label", class_labels, "label", "--label-column")


def _row_sizes(file: str, column: str) -> list[int]:
    """Image bytes per row, for planning shard sizes: exact from an Arrow file's offsets,
    estimated per row group from parquet metadata."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not file.endswith(".parquet"):
        sizes = []
        for chunk in _arrow_table(file).column(column).chunks:
            values = chunk.field("bytes") if hasattr(chunk, "field") else chunk
            sizes.extend(pc.fill_null(pc.binary_length(values), 0).to_pylist())
        return sizes
    meta = pq.ParquetFile(file).metadata
    sizes = []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        total = sum(group.column(c).total_uncompressed_size for c in range(group.num_columns)
                    if group.column(c).path_in_schema.split(".")[0] == column)
        sizes.extend([total // max(1, group.num_rows)] * group.num_rows)
    return sizes


@dataclass
class TableImages:
    """Picklable reader for the shard writer: the image bytes of items (``path`` a data
    file, ``row`` the row in it), reading only the row groups a shard needs."""

    column: str
    base: str

    def __call__(self, items: list[Item]):
        start = 0
        while start < len(items):
            end = start
            while end < len(items) and items[end].path == items[start].path:
                end += 1
            values = self._rows(items[start].path, [item.row for item in items[start:end]])
            for item, value in zip(items[start:end], values, strict=True):
                yield self._image(item, value)
            start = end

    def _rows(self, file: str, rows: list[int]) -> list:
        import pyarrow.parquet as pq

        if not file.endswith(".parquet"):
            return _arrow_table(file).column(self.column).take(rows).to_pylist()
        handle = pq.ParquetFile(file)
        starts = [0]
        for g in range(handle.metadata.num_row_groups):
            starts.append(starts[-1] + handle.metadata.row_group(g).num_rows)
        groups = sorted({bisect.bisect_right(starts, r) - 1 for r in rows})
        before, offset = {}, 0
        for g in groups:
            before[g], offset = offset, offset + starts[g + 1] - starts[g]
        table = handle.read_row_groups(groups, columns=[self.column])
        positions = [before[g] + r - starts[g] for r in rows for g in [bisect.bisect_right(starts, r) - 1]]
        return table.column(self.column).take(positions).to_pylist()

    def _image(self, item: Item, value) -> tuple[str, bytes]:
        data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
        if data is None and path:
            full = path if os.path.isabs(path) else os.path.join(self.base, path)
            if os.path.isfile(full):
                with open(full, "rb") as fh:
                    data = fh.read()
        if data is None:
            raise KdscaleError(f"{item.path} row {item.row}: no image bytes (path {path!r} not found)")
        for magic, ext in MAGIC:
            if data.startswith(magic):
                return ext, data
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return "webp", data
        from PIL import Image

        try:  # BMP, GIF, TIFF...: the loader reads JPEG, PNG and WebP, so re-encode losslessly
            with Image.open(io.BytesIO(data)) as image:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                return "png", buffer.getvalue()
        except OSError:
            return "jpg", data  # undecodable: kept as is, `kdscale shards verify` names it by key


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
              workers: int = 2, progress: bool = True, log=print) -> dict:
    """Write shards of a Hugging Face dataset on disk; returns the index."""
    import pyarrow as pa

    found = find_splits(path)
    mapping = output_splits(list(found), splits)
    first = found[next(iter(mapping))][0]
    features = features_of(first)
    image_column, label_column = pick_columns(first, features, image_column, label_column)
    labels: dict[str, list] = {}
    for name in mapping:
        labels[name] = []
        for file in found[name]:
            if label_column not in _schema(file).names:
                raise KdscaleError(f"{file}: no column {label_column!r}; fix: pass --label-column NAME")
            labels[name].extend(_column(file, label_column).to_pylist())
    label_type = _schema(first).field(label_column).type
    classes = list((features.get(label_column) or {}).get("names") or [])
    if not classes and (pa.types.is_string(label_type) or pa.types.is_large_string(label_type)):
        classes = sorted({v for values in labels.values() for v in values if v is not None})
    elif not classes:
        top = max((v for values in labels.values() for v in values if v is not None), default=-1)
        classes = [str(i) for i in range(top + 1)]
    lookup = {name: i for i, name in enumerate(classes)}
    base = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    index: dict = {}
    for name, out_split in mapping.items():
        values = [lookup.get(v, -1) if isinstance(v, str) else (-1 if v is None else int(v)) for v in labels[name]]
        if any(v < 0 for v in values):
            unlabelled = sum(v < 0 for v in values)
            if splits:
                raise KdscaleError(f"split {name}: {unlabelled} of {len(values)} rows have no label (-1 or "
                                   f"missing); it cannot be converted for training")
            log(f"skipping split {name}: {unlabelled} of {len(values)} rows have no label (-1 or missing)")
            continue
        items, position = [], 0
        for file in found[name]:
            for row, size in enumerate(_row_sizes(file, image_column)):
                items.append(Item(file, values[position], f"{out_split}/{position:08d}", max(1, size), row=row))
                position += 1
        shard_classes = align_classes(items, classes, existing_classes(out), path)[1]
        index = write_folder_shards(items, shard_classes, out, out_split, max_count=max_count,
                                    max_bytes=max_bytes, workers=workers, progress=progress,
                                    reader=TableImages(image_column, base), generator=GENERATOR,
                                    extra={"source": {"huggingface": os.path.abspath(path), "image_column":
                                                      image_column, "label_column": label_column}})
        log(f"{name} -> {out_split}: {index['splits'][out_split]['samples']} samples")
    if not index:
        raise KdscaleError(f"{path}: no labelled split to convert")
    return index
