"""What a network expects its input to be: per-channel mean and std, and input size.

A network pretrained elsewhere comes with the preprocessing it was trained with:
- timm: the ``pretrained_cfg`` of the weights' tag (``mean``, ``std``, ``input_size``;
  timm's ``data.resolve_data_config`` reads the same fields);
- torchvision: the weight enum's ``transforms`` (``ImageClassification(crop_size,
  resize_size, mean, std)``), of which the crop size is the input size.

Choices: the train-time ``input_size`` is used, not timm's ``test_input_size`` (the size a
model was trained at is the one its features are calibrated for); ``crop_pct`` and the
interpolation are not applied, because the teacher is shown the student's crop resized,
so both see the same content (see :mod:`kdscale.teachers.views`). Weights read from a
file carry no metadata: such a network gets the data section's preprocessing unless
``teacher.mean`` / ``teacher.std`` / ``teacher.input_size`` say otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdscale.errors import KdscaleError

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class Preprocessing:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int]
    """(height, width) in pixels."""
    origin: str = "data"
    """Where the values came from (``data``, ``teacher.*``, a timm tag or torchvision enum)."""

    def as_meta(self) -> dict:
        """JSON-able form (teacher-output shards' metadata, logs)."""
        return {"mean": list(self.mean), "std": list(self.std), "input_size": list(self.input_size),
                "from": self.origin}

    def same_as(self, other: Preprocessing) -> bool:
        return (self.mean, self.std, self.input_size) == (other.mean, other.std, other.input_size)


def data_preprocessing(data) -> Preprocessing:
    """The student's view: what the loader produces (``data.mean``, ``data.std``, ``data.image_size``)."""
    mean = _channels(data.mean, "data.mean")
    std = _channels(data.std, "data.std")
    return Preprocessing(mean, std, (data.image_size, data.image_size), "data")


def pretrained_preprocessing(name: str, weights: str | None, where: str = "teacher") -> Preprocessing | None:
    """The preprocessing the hub weights ``weights`` of model ``name`` were trained with, or
    None when the weights are unset or a file (no metadata)."""
    if not weights:
        return None
    if name.startswith(TIMM_PREFIX) and weights.startswith(TIMM_PREFIX):
        from kdscale.models.timm_models import pretrained_variant

        variant = pretrained_variant(name[len(TIMM_PREFIX):], weights[len(TIMM_PREFIX):], f"{where}.weights")
        import timm.models

        cfg = timm.models.get_pretrained_cfg(variant)
        height, width = cfg.input_size[-2:]
        return Preprocessing(tuple(map(float, cfg.mean)), tuple(map(float, cfg.std)), (height, width),
                             f"timm pretrained_cfg {variant}")
    if name.startswith(TORCHVISION_PREFIX) and weights.startswith(TORCHVISION_PREFIX):
        from kdscale.models.weights import torchvision_weights_enum

        enum = torchvision_weights_enum(name[len(TORCHVISION_PREFIX):], weights[len(TORCHVISION_PREFIX):],
                                        where=f"{where}.weights")
        transform = enum.transforms()
        crop = getattr(transform, "crop_size", None)
        if crop is None or not hasattr(transform, "mean"):
            return None  # not an ImageClassification preset: nothing to read
        side = crop[0] if isinstance(crop, (list, tuple)) else crop
        return Preprocessing(tuple(map(float, transform.mean)), tuple(map(float, transform.std)), (side, side),
                             f"torchvision {enum}")
    return None


def network_preprocessing(data, spec, where: str = "teacher") -> Preprocessing:
    """A network's preprocessing, each field taken from the first that sets it: the spec
    (``<where>.mean``, ``.std``, ``.input_size``), the pretrained weights' metadata, the
    data section (the student's view)."""
    base = data_preprocessing(data)
    pretrained = pretrained_preprocessing(spec.name, spec.weights, where) or base
    fields, origins = {}, []
    for key in ("mean", "std", "input_size"):
        value = getattr(spec, key, None)
        if value is None:
            fields[key] = getattr(pretrained, key)
            origins.append(pretrained.origin)
            continue
        if key == "input_size":
            fields[key] = (value, value)
        else:
            fields[key] = _channels(value, f"{where}.{key}")
        origins.append(f"{where}.{key}")
    origin = ", ".join(dict.fromkeys(origins))  # in order, without repeats
    return Preprocessing(fields["mean"], fields["std"], fields["input_size"], origin)


def _channels(values, key: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise KdscaleError(f"{key}: expected 3 values (one per RGB channel), got {len(values)}: {list(values)}")
    if key.endswith("std") and min(values) <= 0:
        raise KdscaleError(f"{key}: standard deviations must be > 0, got {list(values)}")
    return values
