"""timm models: ``timm:<name>`` (``timm:convnext_tiny``, ``timm:resnet50.a1_in1k``).

Weights (``<where>.weights``):
- ``timm:DEFAULT``: the tag in the name, else the architecture's default pretrained tag;
- ``timm:<tag>`` (``timm:a1_in1k``): that pretrained tag; it must agree with a tag in the name;
- a file: built with random weights, then loaded by :func:`kdscale.models.weights.load_weights`.

Hub weights go through timm's own loader (``timm.create_model(..., pretrained=True)``,
timm 1.0: ``timm.models._builder.load_pretrained``), which fetches through
``huggingface_hub`` into its cache (``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``)
or torch.hub's for URL-only weights. Without internet, copy the cache from a machine with
it and set ``HF_HUB_OFFLINE=1``; or point ``weights`` at a file.

Classes: when ``num_classes`` differs from the weights', timm drops the classifier and
initialises a new one (fine-tuning). kdscale allows that for a student (with a warning)
and refuses it for a teacher, whose random head would teach noise.
"""

from __future__ import annotations

import difflib
import warnings

from torch import nn

from kdscale.errors import KdscaleError

PREFIX = "timm:"


def _timm():
    import timm

    return timm


def check_name(name: str, where: str) -> str:
    """``name`` (without ``timm:``), checked against timm's registry."""
    timm = _timm()
    if not name or not timm.is_model(name):
        arch = timm.models.split_model_name_tag(name)[0]
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(PREFIX + c for c in close)}? " if close else ""
        raise KdscaleError(f"{where}.name: timm has no model {name!r}; {hint}list them with "
                           f"python -c \"import timm; print(timm.list_models('*convnext*'))\"")
    arch, tag = timm.models.split_model_name_tag(name)
    if tag and tag not in _tags(arch):
        raise KdscaleError(f"{where}.name: timm model {arch} has no pretrained tag {tag!r}; "
                           f"tags: {', '.join(_tags(arch)) or 'none'}")
    return name


def _tags(arch: str) -> list[str]:
    """Pretrained tags of ``arch`` that have weights somewhere (hub, URL or file)."""
    cfgs = _timm().models.get_arch_pretrained_cfgs(arch)
    return [full.split(".", 1)[1] for full, cfg in cfgs.items()
            if "." in full and (cfg.hf_hub_id or cfg.url or cfg.file)]


def pretrained_variant(name: str, weights_tag: str, where: str) -> str:
    """``arch.tag`` for ``weights: timm:<weights_tag>`` on model ``name`` (``DEFAULT``: the
    name's tag, else the architecture's default)."""
    timm = _timm()
    arch, name_tag = timm.models.split_model_name_tag(check_name(name, where.rsplit(".", 1)[0]))
    tags = _tags(arch)
    if not tags:
        raise KdscaleError(f"{where}: timm has no pretrained weights for {arch}; point {where} at a file or unset it")
    if weights_tag == "DEFAULT":
        default = timm.models.get_pretrained_cfg(arch).tag
        tag = name_tag or (default if default in tags else tags[0])
    else:
        tag = weights_tag
        if tag not in tags:
            raise KdscaleError(f"{where}: timm model {arch} has no pretrained tag {tag!r}; "
                               f"choose DEFAULT or one of {', '.join(tags)}")
        if name_tag and name_tag != tag:
            raise KdscaleError(f"{where}={PREFIX}{tag} contradicts the tag in the name ({arch}.{name_tag}); "
                               f"use {PREFIX}DEFAULT or drop the tag from the name")
    return f"{arch}.{tag}"


def build_timm(name: str, num_classes: int, weights: str | None, where: str, options: dict | None = None) -> nn.Module:
    """``timm.create_model`` for ``timm:<name>`` (with ``options``, the entry's ``timm_options``);
    hub weights when ``weights`` is ``timm:*`` (a file is loaded by the caller). ``num_classes=0``:
    no classifier (a teacher that teaches features only)."""
    timm = _timm()
    check_name(name, where)
    options = dict(options or {})
    if not (weights and weights.startswith(PREFIX)):
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, **options)
        except TypeError as err:
            raise KdscaleError(f"{where}.timm_options={options}: timm's {name} refused them ({err})") from None
    variant = pretrained_variant(name, weights[len(PREFIX):], f"{where}.weights")
    classes = timm.models.get_pretrained_cfg(variant).num_classes
    if classes and num_classes and classes != num_classes:
        message = (f"{where}: weights {PREFIX}{variant} have {classes} classes but {where} is built with "
                   f"{num_classes}")
        if where == "teacher":
            raise KdscaleError(f"{message}; timm would replace the classifier with a random one. Set "
                               f"{where}.num_classes={classes} or load fine-tuned weights from a file")
        warnings.warn(f"{message}: timm keeps the backbone and initialises a new classifier (fine-tuning)",
                      stacklevel=3)
    try:
        return timm.create_model(variant, pretrained=True, num_classes=num_classes, **options)
    except Exception as err:  # noqa: BLE001 - huggingface_hub, urllib and torch raise many types
        raise KdscaleError(
            f"{where}.weights={weights}: timm could not load {variant} ({type(err).__name__}: {_first_line(err)}); "
            f"without internet, copy the Hugging Face cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub) from a "
            f"machine that has it and set HF_HUB_OFFLINE=1, or point {where}.weights at a local "
            f".safetensors/.pth file") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
