"""The label files of ImageNet's official val set (a flat folder of ILSVRC2012_val_*.JPEG,
labels apart), as ``(file name, class, where)`` rows for
``kdscale shards from-folder SRC --labels FILE``.
"""

from __future__ import annotations

import os

from kdscale.errors import KdscaleError


def _devkit_wnids(meta_path: str) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID of the 1000 leaf synsets, from the devkit's data/meta.mat
    (as torchvision's ``parse_devkit_archive`` reads it)."""
    try:
        import scipy.io
    except ImportError:
        raise KdscaleError(f"reading {meta_path} needs scipy; fix: pip install scipy, or use a "
                           "'<filename> <wnid>' label file") from None
    synsets = scipy.io.loadmat(meta_path, squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}


def val_label_rows(labels: str) -> list[tuple[str, str, str]]:
    """``(file name, class, where)`` rows from a val label file, in one of three forms:

    - ``<filename> <class>`` lines; class a name (the WNID) or an index into the sorted
      class folders of the train split;
    - Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the class is the
      first WNID of the prediction string);
    - the devkit's ``ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID per line,
      line i for ``ILSVRC2012_val_<i, 8 digits>.JPEG``), with the devkit's ``meta.mat``
      beside it to map IDs (devkit order, not sorted) to WNIDs.
    """
    if not os.path.isfile(labels):
        raise KdscaleError(f"label file not found: {labels}")
    with open(labels) as fh:
        lines = [(n, line.strip()) for n, line in enumerate(fh, start=1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if lines and lines[0][1].startswith("ImageId,"):
        return [(f"{line.split(',')[0]}.JPEG", line.split(",")[1].split()[0], f"{labels}:{n}")
                for n, line in lines[1:]]
    if lines and all(line.isdigit() for _, line in lines):
        meta = os.path.join(os.path.dirname(os.path.abspath(labels)), "meta.mat")
        if not os.path.isfile(meta):
            raise KdscaleError(f"{labels} holds ILSVRC2012_IDs (the devkit's order, not the class folders'): "
                               f"{meta} is needed to map them to WNIDs; fix: keep the devkit's data/ folder whole")
        wnids = _devkit_wnids(meta)
        rows = []
        for n, line in lines:
            if int(line) not in wnids:
                raise KdscaleError(f"{labels}:{n}: ILSVRC2012_ID {line} is not a leaf synset of {meta}")
            rows.append((f"ILSVRC2012_val_{n:08d}.JPEG", wnids[int(line)], f"{labels}:{n}"))
        return rows
    rows = []
    for n, line in lines:
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise KdscaleError(f"{labels}:{n}: expected '<filename> <class>', got {line!r}")
        rows.append((parts[0], parts[1], f"{labels}:{n}"))
    return rows
