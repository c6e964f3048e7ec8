"""``kdscale shards from-torchvision``: a torchvision dataset, as torchvision keeps it on
disk, to train and val tar shards with ``index.json`` (the layout of ``from-folder``,
written by :mod:`kdscale.data.shard_writer`).

Datasets are read by torchvision's own classes (``download=False``, or ``download=True``
with ``--download``), so their files are checked and parsed exactly as torchvision does.
Before that, the files torchvision needs are looked for, so a missing or incomplete
folder gives one line: the folder, the missing files, and the fix. Images are
JPEG-encoded at their own size (CIFAR stays 32x32) with 4:4:4 chroma (no colour
subsampling: at 32 px it would blur the colours visibly); labels are torchvision's
targets, the class names go to ``index.json``. The test split becomes ``val``.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
from dataclasses import dataclass

from kdscale.data.shard_writer import (
    Item,
    align_classes,
    existing_classes,
    write_folder_shards,
)
from kdscale.errors import KdscaleError

DATASETS = ("CIFAR10", "CIFAR100", "SVHN", "MNIST", "FashionMNIST", "STL10")
MNIST_FAMILY = ("MNIST", "FashionMNIST")
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
GENERATOR = "kdscale from-torchvision"


@dataclass
class Layout:
    """Where torchvision keeps a dataset under ``--root`` and how to get it there."""

    folder: str                          # relative to the root
    files: list[tuple[str, str | None]]  # (file in the folder, torchvision's md5 or None)
    splits: dict[str, dict]              # our split -> the torchvision class's split arguments
    source: str                          # what to put where, without --download


def dataset_class(name: str):
    import torchvision.datasets as tvd

    canonical = {n.lower(): n for n in DATASETS}.get(name.lower())
    if canonical is None:
        raise KdscaleError(f"unknown torchvision dataset {name!r}; supported: {', '.join(DATASETS)}")
    return canonical, getattr(tvd, canonical)


def dataset_layout(name: str, cls, root: str) -> Layout:
    if name in ("CIFAR10", "CIFAR100"):
        files = [(f, md5) for f, md5 in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta["md5"])]
        return Layout(cls.base_folder, files, {"train": {"train": True}, "val": {"train": False}},
                      f"extract {cls.filename} ({cls.url}) in {root}")
    if name == "SVHN":
        files = [(cls.split_list[s][1], cls.split_list[s][2]) for s in ("train", "test")]
        return Layout("", files, {"train": {"split": "train"}, "val": {"split": "test"}},
                      f"put {' and '.join(f for f, _ in files)} (http://ufldl.stanford.edu/housenumbers/) in {root}")
    if name == "STL10":
        return Layout(cls.base_folder, [(f, md5) for f, md5 in cls.train_list + cls.test_list],
                      {"train": {"split": "train"}, "val": {"split": "test"}},
                      f"extract {cls.filename} ({cls.url}) in {root}")
    folder = os.path.join(name, "raw")
    return Layout(folder, [(os.path.splitext(f)[0], None) for f, _ in cls.resources],
                  {"train": {"train": True}, "val": {"train": False}},
                  f"put the four idx files ({', '.join(f for f, _ in cls.resources)}, from {cls.mirrors[0]}) in "
                  f"{os.path.join(root, folder)}")


def check_files(name: str, root: str, layout: Layout) -> None:
    """One clear error when torchvision's files are not all there (MNIST's .gz files, as
    downloaded by hand, are unpacked first, as torchvision's downloader would)."""
    if name == "SVHN":
        import importlib.util

        if importlib.util.find_spec("scipy") is None:
            raise KdscaleError("SVHN: torchvision reads SVHN's .mat files with scipy, which is not installed; "
                               "fix: pip install scipy")
    folder = os.path.join(root, layout.folder)
    if name in MNIST_FAMILY and all(os.path.isfile(os.path.join(root, name, "processed", f"{s}.pt"))
                                    for s in ("training", "test")):
        return  # the layout of torchvision before 0.9, which it still reads
    for file, _md5 in layout.files:
        path = os.path.join(folder, file)
        if name in MNIST_FAMILY and not os.path.isfile(path) and os.path.isfile(path + ".gz"):
            with gzip.open(path + ".gz", "rb") as src, open(path + ".tmp", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(path + ".tmp", path)
    missing = [file for file, _ in layout.files if not os.path.isfile(os.path.join(folder, file))]
    if missing:
        state = (f"{os.path.normpath(folder)} is incomplete" if os.path.isdir(folder)
                 else f"folder {os.path.normpath(folder)} not found")
        raise KdscaleError(f"{name}: {state}: missing {', '.join(missing)}; fix: add --download "
                           f"(torchvision downloads it where a network is reachable), or {layout.source}")


def load_split(name: str, cls, root: str, layout: Layout, split: str, download: bool):
    """The torchvision dataset of one split, or a one-line error saying what is wrong."""
    from torchvision.datasets.utils import check_integrity

    kwargs = layout.splits[split]
    if not download:
        check_files(name, root, layout)
    try:
        return cls(root, download=download, **kwargs)
    except Exception as err:  # noqa: BLE001 - torchvision raises many kinds; each becomes one line
        if download and not all(os.path.isfile(os.path.join(root, layout.folder, f)) for f, _ in layout.files):
            raise KdscaleError(f"{name}: the download into {root} failed ({type(err).__name__}: {err}); fix: "
                               f"without a network, {layout.source}") from None
        folder = os.path.join(root, layout.folder)
        bad = [f for f, md5 in layout.files if md5 and not check_integrity(os.path.join(folder, f), md5)]
        if bad:
            raise KdscaleError(f"{name}: {', '.join(bad)} in {folder} fail torchvision's checksum (a partial or "
                               f"different download); fix: delete them and rerun with --download, or "
                               f"{layout.source}") from None
        raise KdscaleError(f"{name}: torchvision cannot read {folder} ({type(err).__name__}: {err}); fix: "
                           f"{layout.source}") from None


def class_names(name: str, dataset) -> list[str]:
    if name == "SVHN":
        return [str(digit) for digit in range(10)]  # torchvision maps the digit 0 (label 10) to 0
    if name == "STL10":
        return list(getattr(dataset, "classes", None) or STL10_CLASSES)
    return [str(c) for c in dataset.classes]


def encode_jpeg(image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def import_torchvision(name: str, root: str, out: str, download: bool = False, quality: int = 95,
                       max_count: int = 1000, max_bytes: int = 1 << 30, workers: int = 2,
                       progress: bool = True) -> dict:
    """Write ``train`` and ``val`` shards of torchvision dataset ``name`` from ``root``."""
    if not 1 <= quality <= 100:
        raise KdscaleError(f"--quality must be 1..100, got {quality}")
    name, cls = dataset_class(name)
    root = os.path.abspath(os.path.expanduser(root))
    layout = dataset_layout(name, cls, root)
    index: dict = {}
    for split in layout.splits:
        dataset = load_split(name, cls, root, layout, split, download)
        classes = class_names(name, dataset)
        items, where = [], os.path.join(root, layout.folder)
        for i in range(len(dataset)):
            image, target = dataset[i]
            data = encode_jpeg(image, quality)
            key = f"{split}/{i:06d}"
            items.append(Item(f"{where}[{split} {i}]", int(target), key, len(data), data=data, ext="jpg"))
        items, classes = align_classes(items, classes, existing_classes(out), f"{name} in {root}")
        index = write_folder_shards(items, classes, out, split, max_count=max_count, max_bytes=max_bytes,
                                    workers=workers, progress=progress, generator=GENERATOR,
                                    extra={"source": {"torchvision": name, "root": root, "jpeg_quality": quality}})
    return index
