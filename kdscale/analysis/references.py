"""Published top-1 figures that ``kdscale compare --group-by`` prints next to a group's
mean over seeds, matched by (dataset, method, teacher, student).

Two kinds of figures are here, each with where it is published and the setting it was
measured in:
- those recorded in the project's design notes (``design/anchors.md``, "published top-1 %,
  from the authors' READMEs");
- for the methods kdscale ships that the notes leave out (FitNet, RKD, PKT, SP, CRD) and the
  other pairs of DKD and DIST, the figures that the method's config cites
  (``configs/<method>_cifar100.yaml``), each read back from that README table.
``checked`` names the README the figure was read back from; an empty ``checked`` means the
figure is as the design notes give it and was not found in the README text we checked (the
authors' paper is the likely place): treat it with care. No other figures are added here: a
number neither in the design notes nor cited by a shipped config, and read back from its
README, has no place in this table, however well known. One exception, marked in its
``source``: where the authors publish no README table (ReviewKD's CIFAR-100 README has none),
the paper's figure that the shipped config cites, with ``checked`` empty.

Matching ignores case, ``-``, ``_``, spaces and a ``torchvision:``/``timm:`` prefix, so
``wrn_40_2`` matches ``wrn-40-2`` and ``torchvision:resnet34`` matches ``ResNet-34``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

REPDISTILLER = "RepDistiller README, CIFAR-100 benchmark table (Tian et al., CRD, ICLR 2020)"
MDISTILLER = "mdistiller README, DKD main results (Zhao et al., DKD, CVPR 2022)"
DIST = "DIST_KD README, ImageNet baseline settings (Huang et al., DIST, NeurIPS 2022)"
DIST_CIFAR = "DIST_KD README, CIFAR-100 table (Huang et al., DIST, NeurIPS 2022)"
LOGIT_STD = "logit-standardization-KD README, CIFAR-100 table (Sun et al., CVPR 2024)"
REVIEWKD = ("ReviewKD paper, CIFAR-100 table (Chen et al., CVPR 2021), as configs/reviewkd_cifar100.yaml cites it; "
            "the authors' README has no table")

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


_R32x4, _R8x4, _W402, _W401, _W162 = "resnet32x4", "resnet8x4", "wrn_40_2", "wrn_40_1", "wrn_16_2"
_R56, _R20, _R110, _R32 = "resnet56", "resnet20", "resnet110", "resnet32"
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
    # Cited by configs/dkd_cifar100.yaml and dist_cifar100.yaml (DIST: mean ± std over the authors' runs).
    _cifar("dkd", _W402, _W162, 76.23, MDISTILLER, URLS["mdistiller"]),
    _cifar("dkd", _R56, _R20, 71.97, MDISTILLER, URLS["mdistiller"]),
    _cifar("dkd", _R110, _R32, 74.11, MDISTILLER, URLS["mdistiller"]),
    _cifar("dist", _R32x4, _R8x4, 76.31, DIST_CIFAR + ", ± 0.19 std over the authors' runs", URLS["dist"]),
    _cifar("dist", _W402, _W401, 74.43, DIST_CIFAR + ", ± 0.24 std over the authors' runs", URLS["dist"]),
    _cifar("dist", _R56, _R20, 71.75, DIST_CIFAR + ", ± 0.30 std over the authors' runs", URLS["dist"]),
    # The feature methods, cited by configs/{fitnet,rkd,pkt,sp}_cifar100.yaml: RepDistiller's table of
    # teacher and student of the same type (the CRD paper's benchmark; the methods run with -a 0).
    _cifar("fitnet", _R32x4, _R8x4, 73.50, REPDISTILLER, URLS["repdistiller"]),
    _cifar("fitnet", _W402, _W162, 73.58, REPDISTILLER, URLS["repdistiller"]),
    _cifar("rkd", _R32x4, _R8x4, 71.90, REPDISTILLER, URLS["repdistiller"]),
    _cifar("rkd", _W402, _W162, 73.35, REPDISTILLER, URLS["repdistiller"]),
    _cifar("pkt", _R32x4, _R8x4, 73.64, REPDISTILLER, URLS["repdistiller"]),
    _cifar("pkt", _W402, _W162, 74.54, REPDISTILLER, URLS["repdistiller"]),
    _cifar("sp", _R32x4, _R8x4, 72.94, REPDISTILLER, URLS["repdistiller"]),
    _cifar("sp", _W402, _W162, 73.83, REPDISTILLER, URLS["repdistiller"]),
    # AT, cited by configs/at_cifar100.yaml: the same table's AT row (the design notes' table too).
    _cifar("at", _W402, _W162, 74.08, REPDISTILLER, URLS["repdistiller"]),
    _cifar("at", _R32x4, _R8x4, 73.44, REPDISTILLER, URLS["repdistiller"]),
    # ReviewKD, cited by configs/reviewkd_cifar100.yaml: the paper's CIFAR-100 table (no README table).
    _cifar("reviewkd", _R32x4, _R8x4, 75.63, REVIEWKD, ""),
    _cifar("reviewkd", _W402, _W162, 76.12, REVIEWKD, ""),
    # CRD itself, cited by configs/crd_cifar100.yaml: the same table's CRD row (-a 0 -b 0.8).
    _cifar("crd", _R32x4, _R8x4, 75.51, REPDISTILLER, URLS["repdistiller"]),
    _cifar("crd", _W402, _W162, 75.48, REPDISTILLER, URLS["repdistiller"]),
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
