"""Published top-1 figures that ``kdscale compare --group-by`` prints next to a group's
mean over seeds, matched by (dataset, method, teacher, student).

Only figures recorded in the project's design notes (``design/anchors.md``, "published
top-1 %, from the authors' READMEs") are here, each with where it is published and the
setting it was measured in. ``checked`` names the README the figure was read back from;
an empty ``checked`` means the figure is as the design notes give it and was not found in
the README text we checked (the authors' paper is the likely place): treat it with care.
No other figures are added here: a number not in the design notes has no place in this
table, however well known.

Matching ignores case, ``-``, ``_``, spaces and a ``torchvision:``/``timm:`` prefix, so
``wrn_40_2`` matches ``wrn-40-2`` and ``torchvision:resnet34`` matches ``ResNet-34``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

REPDISTILLER = "RepDistiller README, CIFAR-100 benchmark table (Tian et al., CRD, ICLR 2020)"
MDISTILLER = "mdistiller README, DKD main results (Zhao et al., DKD, CVPR 2022)"
DIST = "DIST_KD README, ImageNet baseline settings (Huang et al., DIST, NeurIPS 2022)"
LOGIT_STD = "logit-standardization-KD README, CIFAR-100 table (Sun et al., CVPR 2024)"

CIFAR_SETTING = "CIFAR-100 test set, RepDistiller protocol (240 epochs, SGD)"
IMAGENET_SETTING = "ImageNet-1k validation set, 224 px"

URLS = {"repdistiller": "https://github.com/HobbitLong/RepDistiller",
        "mdistiller": "https://github.com/megvii-research/mdistiller",
        "dist": "https://github.com/hunto/DIST_KD",
        "logit_std": "https://github.com/sunshangquan/logit-standardization-KD"}


@dataclass(frozen=True)
class Reference:
    dataset: str
    method: str
    teacher: str
    student: str
    top1: float
    source: str
    setting: str
    checked: str = ""
    """The README the figure was read back from (empty: as the design notes give it)."""


def _cifar(method, teacher, student, top1, source, checked):
    return Reference("cifar100", method, teacher, student, top1, source, CIFAR_SETTING, checked)


def _imagenet(method, teacher, student, top1, source, checked):
    return Reference("imagenet", method, teacher, student, top1, source, IMAGENET_SETTING, checked)


_R32x4, _R8x4, _W402, _W401 = "resnet32x4", "resnet8x4", "wrn_40_2", "wrn_40_1"
_R34, _R18, _R50, _MBV1 = "resnet34", "resnet18", "resnet50", "mobilenet_v1"
_AS_NOTED = "design/anchors.md (authors' README or paper; not found in the README text checked)"

REFERENCES: tuple[Reference, ...] = (
    _cifar("kd", _R32x4, _R8x4, 73.33, REPDISTILLER, URLS["repdistiller"]),
    _cifar("dkd", _R32x4, _R8x4, 76.32, MDISTILLER, URLS["mdistiller"]),
    _cifar("kd+ls", _R32x4, _R8x4, 76.62, LOGIT_STD, URLS["logit_std"]),
    _cifar("mlkd", _R32x4, _R8x4, 77.08, LOGIT_STD + "; MLKD: Jin et al., CVPR 2023", URLS["logit_std"]),
    _cifar("mlkd+ls", _R32x4, _R8x4, 78.28, LOGIT_STD, URLS["logit_std"]),
    _cifar("kd", _W402, _W401, 73.54, REPDISTILLER, URLS["repdistiller"]),
    _cifar("dkd", _W402, _W401, 74.81, MDISTILLER, URLS["mdistiller"]),
    _cifar("kd+ls", _W402, _W401, 74.37, LOGIT_STD, URLS["logit_std"]),
    _cifar("mlkd", _W402, _W401, 75.35, LOGIT_STD + "; MLKD: Jin et al., CVPR 2023", URLS["logit_std"]),
    _cifar("mlkd+ls", _W402, _W401, 75.56, LOGIT_STD, URLS["logit_std"]),
    _imagenet("kd", _R34, _R18, 71.03, MDISTILLER, URLS["mdistiller"]),
    _imagenet("dkd", _R34, _R18, 71.70, MDISTILLER, URLS["mdistiller"]),
    _imagenet("dist", _R34, _R18, 72.07, DIST, URLS["dist"]),
    _imagenet("kd+ls", _R34, _R18, 71.42, "Logit standardization (Sun et al., CVPR 2024)", ""),
    _imagenet("dist+", _R34, _R18, 72.39, "DIST+ (the DIST authors)", ""),
    _imagenet("kd", _R50, _MBV1, 70.50, MDISTILLER, URLS["mdistiller"]),
    _imagenet("dkd", _R50, _MBV1, 72.05, MDISTILLER, URLS["mdistiller"]),
    _imagenet("dist", _R50, _MBV1, 73.24, DIST, URLS["dist"]),
)

_DATASET_ALIASES = {"cifar100": "cifar100", "imagenet": "imagenet", "imagenet1k": "imagenet",
                    "ilsvrc2012": "imagenet", "in1k": "imagenet"}


def normalise(name: str | None) -> str:
    """``torchvision:ResNet-34`` -> ``resnet34``; ``wrn_40_2`` -> ``wrn402``."""
    if not name:
        return ""
    name = str(name).strip().lower()
    if name.startswith(("torchvision:", "timm:")):
        name = name.split(":", 1)[1]
    return re.sub(r"[\s_\-]", "", name)


def normalise_dataset(name: str | None) -> str:
    key = normalise(name)
    return _DATASET_ALIASES.get(key, key)


def lookup(dataset: str | None, method: str | None, teacher: str | None, student: str | None) -> Reference | None:
    """The published figure for this setting, or None where kdscale ships none."""
    wanted = (normalise_dataset(dataset), normalise(method), normalise(teacher), normalise(student))
    if not all(wanted):
        return None
    for ref in REFERENCES:
        if (normalise_dataset(ref.dataset), normalise(ref.method), normalise(ref.teacher),
                normalise(ref.student)) == wanted:
            return ref
    return None


def cite(ref: Reference) -> str:
    where = ref.checked or _AS_NOTED
    return (f"{ref.method} {ref.teacher} -> {ref.student}, {ref.dataset}: top-1 {ref.top1:.2f}% ({ref.setting}); "
            f"{ref.source}; {where}")
