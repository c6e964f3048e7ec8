"""Teacher-output shards (the FKD idea, keyed by sample, not by dataset index).

For every image shard ``<name>.tar`` a companion ``<outputs>/<name>.tar`` holds, per
sample key and in the same order, one member ``<key>.teacher`` with:

- R random-resized crop boxes ``(x0, y0, w, h)`` as fractions of the image size (float32);
- R horizontal flip flags (uint8);
- the teacher's top-k probabilities on each crop (softmax at T=1, float16, [R, k]);
- their class indices (int32, [R, k]; never floats: fp16 cannot hold indices above 2048).

The record is a fixed little-endian layout: magic ``KDTO``, version, R, k (int32 each),
then the four arrays back to back. One member per sample keeps the companion cheap to
stream (tar members, not bytes, are what costs in Python).

A teacher whose entry's ``targets`` name ``summary`` and/or ``spatial`` features (the
``features`` method; :mod:`kdscale.models.feature_targets`) also stores each crop's features
as float16: version 2 adds, after k, the number of feature kinds F, and per kind its code
(0 summary, 1 spatial), its number of dimensions and its per-crop shape (int32 each); the
features, ``(R, *shape)`` per kind, follow the classes. Without ``logits`` among the targets
no probabilities are stored (k = 0). ``teacher_outputs.json`` records ``targets`` and
``target_shapes`` (per crop). :func:`record_bytes` gives what a sample costs on disk.

Training with ``teacher.source: shards`` replays one stored crop per sample (chosen by the
per-sample generator) and uses its soft label, so no teacher runs. The soft label is the
top-k probabilities with the remaining mass spread evenly over the other classes; its log
is handed to the method as the teacher's logits, so at T=1 KD sees the teacher's
distribution up to the top-k truncation, and at other temperatures its tempered version
(``softmax(log q / T)``).
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from kdscale.data.transforms import random_resized_crop_box
from kdscale.errors import KdscaleError

META_FILE = "teacher_outputs.json"


def crop_boxes(key: str, width: int, height: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random-resized crop boxes (fractions) and flip flags for one sample,
    reproducible from (seed, key)."""
    rng = random.Random(f"{seed}/{key}/crops")
    boxes, flips = [], []
    for _ in range(count):
        left, top, w, h = random_resized_crop_box(width, height, rng)
        boxes.append((left / width, top / height, w / width, h / height))
        flips.append(rng.random() < 0.5)
    return np.asarray(boxes, dtype=np.float32), np.asarray(flips, dtype=np.uint8)


def replay_crop(image: Image.Image, box, flip: bool, size: int) -> torch.Tensor:
    """The uint8 (3, size, size) view for a stored crop: the one view both the teacher
    (when writing) and the student (when training) see."""
    x0, y0, w, h = (float(v) for v in box)
    left, top = round(x0 * image.width), round(y0 * image.height)
    right = max(left + 1, round((x0 + w) * image.width))
    bottom = max(top + 1, round((y0 + h) * image.height))
    view = TF.pil_to_tensor(image.resize((size, size), Image.BILINEAR, box=(left, top, right, bottom)))
    return view.flip(-1) if flip else view


_MAGIC, _VERSION = b"KDTO", 1
_VERSION_FEATURES = 2
FIELD = "teacher"
FEATURE_KINDS = ("summary", "spatial")
"""Feature kinds a record can hold, in their stored order; a kind's code is its index."""


def encode_record(crops, flips, probs, classes, features: dict | None = None) -> dict[str, bytes]:
    """One sample's record; ``features``: kind -> float16 ``(R, *shape)`` (version 2), else version 1."""
    crops = np.ascontiguousarray(crops, dtype="<f4").reshape(-1, 4)
    count = crops.shape[0]
    probs = np.ascontiguousarray(probs, dtype="<f2")
    probs = probs.reshape(count, probs.shape[-1] if probs.ndim == 2 else -1)  # (0, k) for a sample without crops
    top_k = probs.shape[1]
    kinds = [kind for kind in FEATURE_KINDS if kind in (features or {})]
    if kinds:
        head = [_VERSION_FEATURES, count, top_k, len(kinds)]
        for kind in kinds:
            shape = np.shape(features[kind])[1:]
            head += [FEATURE_KINDS.index(kind), len(shape), *shape]
        header = _MAGIC + np.asarray(head, dtype="<i4").tobytes()
    else:
        header = _MAGIC + np.asarray([_VERSION, count, top_k], dtype="<i4").tobytes()
    body = [crops.tobytes(), np.ascontiguousarray(flips, dtype="u1").reshape(count).tobytes(),
            probs.tobytes(), np.ascontiguousarray(classes, dtype="<i4").reshape(count, top_k).tobytes()]
    body += [np.ascontiguousarray(features[kind], dtype="<f2").tobytes() for kind in kinds]
    return {FIELD: header + b"".join(body)}


def decode_record(sample: dict) -> dict:
    """``crops``, ``flips``, ``probs``, ``classes`` and ``features`` (kind -> ``(R, *shape)``
    float16; empty in a version-1 record)."""
    data = sample.get(FIELD)
    if data is None or data[:4] != _MAGIC or len(data) < 16:
        raise KdscaleError(f"teacher-output sample {sample.get('__key__')} in {sample.get('__url__')} is malformed "
                           f"(no '{FIELD}' record); regenerate it with kdscale.teach")
    version, count, top_k = (int(v) for v in np.frombuffer(data, dtype="<i4", count=3, offset=4))
    if version not in (_VERSION, _VERSION_FEATURES):
        raise KdscaleError(f"teacher-output record version {version} in {sample.get('__url__')} is not supported "
                           f"(expected {_VERSION} or {_VERSION_FEATURES}); regenerate with this kdscale")
    offset, shapes = 16, []
    if version == _VERSION_FEATURES:
        kinds = int(np.frombuffer(data, dtype="<i4", count=1, offset=offset)[0])
        offset += 4
        for _ in range(kinds):
            code, ndim = (int(v) for v in np.frombuffer(data, dtype="<i4", count=2, offset=offset))
            shape = tuple(int(v) for v in np.frombuffer(data, dtype="<i4", count=ndim, offset=offset + 8))
            shapes.append((FEATURE_KINDS[code], shape))
            offset += 8 + 4 * ndim
    arrays = {}
    layout = [("crops", "<f4", (count, 4)), ("flips", "u1", (count,)), ("probs", "<f2", (count, top_k)),
              ("classes", "<i4", (count, top_k))] + [(kind, "<f2", (count, *shape)) for kind, shape in shapes]
    for name, dtype, shape in layout:
        size = int(np.prod(shape))
        arrays[name] = np.frombuffer(data, dtype=dtype, count=size, offset=offset).reshape(shape)
        offset += size * np.dtype(dtype).itemsize
    arrays["features"] = {kind: arrays.pop(kind) for kind, _ in shapes}
    return arrays


def record_bytes(crops: int, top_k: int, shapes: dict[str, tuple[int, ...]]) -> int:
    """Bytes one sample takes in a companion tar: its member's 512-byte header and the record,
    padded to 512 bytes. ``shapes``: the stored feature kinds' per-crop shapes."""
    header = 16 + (4 + sum(8 + 4 * len(shape) for shape in shapes.values()) if shapes else 0)
    per_crop = 16 + 1 + top_k * (2 + 4) + sum(2 * int(np.prod(shape)) for shape in shapes.values())
    return 512 + -(-(header + crops * per_crop) // 512) * 512


def dense_soft_label(probs: np.ndarray, classes: np.ndarray, num_classes: int) -> torch.Tensor:
    """Top-k probabilities + the remaining mass spread evenly over the other classes."""
    p = torch.from_numpy(probs.astype(np.float32))
    idx = torch.from_numpy(classes.astype(np.int64))
    rest = max(0.0, 1.0 - float(p.sum()))
    others = num_classes - idx.numel()
    dense = torch.full((num_classes,), rest / others if others > 0 else 0.0)
    dense[idx] = p
    return dense / dense.sum()


def companion_path(image_shard: str, outputs_dir: str) -> str:
    return os.path.join(outputs_dir, os.path.basename(image_shard))


def check_same_settings(outputs_dir: str, meta: dict) -> None:
    """Refuse to add to (or reuse) teacher outputs written with other settings than ``meta``
    (kdscale.teach reuses finished companions as they are, so every setting that shapes a
    record must be the one recorded); the list of image shards may grow."""
    path = os.path.join(outputs_dir, META_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        recorded = json.load(fh)
    wanted = json.loads(json.dumps(meta))  # as JSON gives it back (tuples as lists)
    changed = [key for key in wanted if key != "image_shards" and recorded.get(key, wanted[key]) != wanted[key]]
    if changed:
        what = ", ".join(f"{key} {recorded.get(key)!r} there, {wanted[key]!r} now" for key in changed)
        raise KdscaleError(f"teacher.outputs={outputs_dir} holds teacher outputs written with other settings ({what}); "
                           f"a rerun reuses its finished shards, so use another teacher.outputs, or delete that "
                           f"directory to rewrite it")


def read_meta(outputs_dir: str) -> dict:
    path = os.path.join(outputs_dir, META_FILE)
    if not os.path.isfile(path):
        raise KdscaleError(f"teacher.outputs={outputs_dir} holds no {META_FILE}: generate the teacher-output shards "
                           f"with `accelerate launch -m kdscale.teach --config <this config>`")
    with open(path) as fh:
        return json.load(fh)


def check_teacher_outputs(image_shards: list[str], outputs_dir: str, num_classes: int) -> dict:
    """Before training: every image shard has its companion and the teacher's classes match."""
    meta = read_meta(outputs_dir)
    if meta["num_classes"] != num_classes:
        raise KdscaleError(f"teacher outputs in {outputs_dir} have {meta['num_classes']} classes, data.num_classes is "
                           f"{num_classes}")
    missing = [s for s in image_shards if not os.path.isfile(companion_path(s, outputs_dir))]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise KdscaleError(f"teacher outputs missing for {len(missing)} of {len(image_shards)} image shards, e.g. "
                           f"{', '.join(os.path.basename(m) for m in missing[:3])}{more} in {outputs_dir}; run "
                           f"kdscale.teach again (it resumes)")
    return meta


def paired_samples(image_shard: str, outputs_dirs: list[str]) -> Iterator[dict]:
    """Image samples with the records of every replayed teacher (one per directory, in order)
    under ``__teacher__``; keys must align."""
    from kdscale.data.tar_reader import iter_samples

    images = iter_samples(image_shard)
    companions = [companion_path(image_shard, d) for d in outputs_dirs]
    for sample, *records in itertools.zip_longest(images, *(iter_samples(c) for c in companions)):
        for companion, record in zip(companions, records):
            if sample is None or record is None:
                raise KdscaleError(f"teacher outputs {companion} and image shard {image_shard} hold different "
                                   f"numbers of samples; regenerate them with kdscale.teach")
            if sample["__key__"] != record["__key__"]:
                raise KdscaleError(f"teacher outputs do not match image shard {image_shard}: key "
                                   f"{sample['__key__']!r} vs {record['__key__']!r} in {companion}; regenerate them "
                                   f"with kdscale.teach")
        sample["__teacher__"] = records
        yield sample


CROP_SETTINGS = ("seed", "crops_per_image", "image_size")
"""What makes two teachers' stored crops the same (:func:`crop_boxes` draws them from the seed
and the sample key; R and the output size are the teach run's)."""


def check_same_crops(metas: dict[str, dict]) -> None:
    """Several replayed teachers: their outputs must store the same crops, since one crop is
    replayed for all of them. ``metas``: outputs directory -> its ``teacher_outputs.json``."""
    (first_dir, first), *others = metas.items()
    for outputs_dir, meta in others:
        differ = [f"{k} {first.get(k)!r} vs {meta.get(k)!r}" for k in CROP_SETTINGS if first.get(k) != meta.get(k)]
        if differ:
            raise KdscaleError(f"teacher outputs {first_dir} and {outputs_dir} store different crops "
                               f"({', '.join(differ)}): one crop is replayed for every teacher; write both with "
                               f"kdscale.teach under the same experiment.seed, teacher.crops_per_image and "
                               f"data.image_size")


def same_crop(first: dict, other: dict, r: int, record: dict) -> None:
    """Stored crop ``r`` is the same box and flip in both teachers' records (else an error
    naming the sample: the directories were checked alike, so the records were rewritten)."""
    if len(other["crops"]) != len(first["crops"]) or not (np.array_equal(other["crops"][r], first["crops"][r])
                                                        and other["flips"][r] == first["flips"][r]):
        raise KdscaleError(f"teacher outputs for sample {record.get('__key__')} in {record.get('__url__')} store "
                           f"another crop than the first replayed teacher's; regenerate them with kdscale.teach")


def replay_sample(decoder, jpeg: bytes, records: list[dict], rng: random.Random, num_classes: int):
    """A stored teacher crop (one of R, chosen by ``rng``; :meth:`SampleDecoder.replay`'s draw)
    as the decoder's normalised view, each replayed teacher's soft label for it ``(teachers,
    classes)`` (uniform for a teacher that stored no probabilities) and their stored features
    for it, ``{teacher slot: {kind: float16 tensor}}``; the records must store the same crops."""
    import io

    arrays = [decode_record(record) for record in records]
    r = rng.randrange(len(arrays[0]["crops"]))
    for other, record in zip(arrays[1:], records[1:]):
        same_crop(arrays[0], other, r, record)
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    view = replay_crop(image, arrays[0]["crops"][r], bool(arrays[0]["flips"][r]), decoder.size)
    soft = torch.stack([dense_soft_label(a["probs"][r], a["classes"][r], num_classes) for a in arrays])
    features = {slot: {kind: torch.from_numpy(np.array(stored[r])) for kind, stored in a["features"].items()}
                for slot, a in enumerate(arrays) if a["features"]}
    return TF.normalize(view.float().div_(255), decoder.mean, decoder.std), soft, features


class Replayed(NamedTuple):
    """A micro-batch's replayed teacher outputs on the device (what the trainer hands its
    teacher source): ``probs`` ``(B, replayed teachers, classes)``; ``features`` by teacher
    slot and kind, ``(B, *shape)`` float32 (stored as float16)."""

    probs: torch.Tensor | None
    features: dict[int, dict[str, torch.Tensor]]
